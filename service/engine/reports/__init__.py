"""Per-request reports (docs/lab.md): what a request may ask for beside its answer
(``"report": ["numerics"]``, ``?report=profile``, v2/gRPC parameter ``report``).

A report is one module here implementing ``Report`` (``base.py``: its name, when it may be
asked for, the memory it costs, the engine function that computes it, how it is carried on
the engine channel and by each wire format), and one line in ``REGISTRY`` below. Nothing
else names a report: request validation (``jobs.py``), the compute thread (``lab.py``), the
engine channel (``ipc/host.py``, ``ipc/remote.py``) and every codec walk this registry, and a
wire format that cannot carry a report refuses the request with a 400 naming it.

Torch-free: the codecs import it. The part that computes a report is named by its
``compute`` ("module:function" in the engine) and loaded only in the compute thread.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.engine.reports import numerics, profile
from service.engine.reports.base import WIRES, BaseReport, Report
from service.errors import InvalidRequest

REGISTRY: dict[str, Report] = {r.name: r for r in (
    numerics.REPORT,
    profile.REPORT,
)}

__all__ = ["REGISTRY", "WIRES", "BaseReport", "Report", "check_wire", "from_channel",
           "header", "names", "parameter", "to_channel"]


def names() -> tuple[str, ...]:
    """Every report a request may ask for, in their canonical order."""
    return tuple(REGISTRY)


def to_channel(reports: dict) -> dict:
    """A job's reports as the engine channel carries them (engine process -> worker)."""
    return {name: REGISTRY[name].to_channel(value) for name, value in reports.items()}


def from_channel(reports: dict) -> dict:
    return {name: REGISTRY[name].from_channel(value) for name, value in reports.items()}


def check_wire(asked: Iterable[str], wire: str, where: str) -> None:
    """400 when ``wire`` (one of ``WIRES``) cannot carry a report the request asks for."""
    for name in asked:
        problem = REGISTRY[name].refuses(wire)
        if problem:
            raise InvalidRequest(f"{where}: the {name} report cannot travel in {wire}: {problem}")


def header(name: str) -> str:
    """The native binary header of a report carried in one: ``X-Report-Numerics``."""
    return "X-Report-" + "-".join(p.capitalize() for p in name.split("_"))


def parameter(name: str) -> str:
    """The v2 (HTTP and gRPC) response parameter that carries a report, as JSON text."""
    return f"report_{name}"
