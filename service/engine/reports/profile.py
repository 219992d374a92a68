"""The profile report (docs/lab.md, "Profiles"): the request run under ``torch.profiler``,
its operator table and Chrome trace. Computed by ``service/engine/profiling.py`` around the
request; allowed only on a server started with ``--allow-profile``. Its trace (JSON bytes)
travels on the engine channel as text, within one message's limit; the HTTP and gRPC layers
keep it for download (``service/http/traces.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.ipc.channel import MAX_TRACE
from service.engine.reports.base import BaseReport
from service.errors import InvalidRequest

if TYPE_CHECKING:
    from service.settings import Settings


class Profile(BaseReport):
    name = "profile"
    compute = "service.engine.profiling:report"
    stage = "around"
    binary = "part"  # a JSON part named profile

    def check(self, settings: Settings, where: str) -> None:
        if not settings.allow_profile:
            raise InvalidRequest(f"{where}: profiles are off on this server; start it with "
                                 "ACTSERVE_ALLOW_PROFILE=true (--allow-profile) to allow them")

    def to_channel(self, value: dict) -> dict:
        """The trace as text, unless it would not fit in one control message (then the
        answer says so instead)."""
        trace = value.get("trace")
        if isinstance(trace, bytes):
            if len(trace) > MAX_TRACE:
                value["trace"] = None
                value["trace_note"] = (f"the trace ({len(trace)} bytes) is over the "
                                       f"{MAX_TRACE} bytes the engine process passes "
                                       "on; profile with --engine inline for this one")
            else:
                value["trace"] = trace.decode()
        return value

    def from_channel(self, value: dict) -> dict:
        """The HTTP layer keeps the trace as bytes."""
        trace = value.get("trace")
        if isinstance(trace, str):
            value["trace"] = trace.encode()
        return value


REPORT = Profile()
