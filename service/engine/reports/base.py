"""What a report is (``Report``) and the defaults most reports keep (``BaseReport``).
Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from service.settings import Settings

# the wire formats that carry reports: native JSON (the answer's "report" object), native
# binary (a header or a JSON part), v2 over HTTP (JSON or binary: a response parameter of
# JSON text) and gRPC (a string response parameter of JSON text)
WIRES = ("native-json", "native-binary", "v2", "grpc")


class Report(Protocol):
    name: str  # what a request asks for; also its key in every answer
    # the engine function that computes it, "module:function", loaded in the compute thread:
    # stage "around": fn(job, device, run) -> (run(), report), wraps the request's
    #   computation (timed with it; e.g. a profiler);
    # stage "after": fn(job, answer) -> report, measures the answer once it is computed
    compute: str
    stage: Literal["around", "after"]
    # native binary: "header" (``X-Report-<Name>``, JSON text) or "part" (a last JSON part
    # named after the report, listed in ``X-Outputs``)
    binary: Literal["header", "part"]

    def check(self, settings: Settings, where: str) -> None:
        """Raise a 400 when this server does not allow it."""

    def bytes_per_element(self, ops: int) -> int:
        """Memory it holds while computed, per element of the request (the working-set
        admission, ``jobs.working_set``); ``ops``: the activation's tensor operations."""

    def to_channel(self, value: object) -> object:
        """The report as the engine channel carries it (plain values: MessagePack)."""

    def from_channel(self, value: object) -> object:
        """Back from the channel, as the server process's encoders expect it."""

    def refuses(self, wire: str) -> str | None:
        """Why ``wire`` (one of ``WIRES``) cannot carry it, or None."""


class BaseReport:
    """A report carried as it is everywhere: a JSON value, a native binary header."""

    name = ""
    compute = ""
    stage: Literal["around", "after"] = "after"
    binary: Literal["header", "part"] = "header"

    def check(self, settings: Settings, where: str) -> None:
        return None

    def bytes_per_element(self, ops: int) -> int:
        return 0

    def to_channel(self, value: object) -> object:
        return value

    def from_channel(self, value: object) -> object:
        return value

    def refuses(self, wire: str) -> str | None:
        return None
