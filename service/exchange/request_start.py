"""When a request started on its caller's clock: ``X-Request-Start``.

A server stamps a request's arrival when it reads the request's first bytes, and counts
its deadline from there. Time spent before that is invisible to it: a connection waiting
in the kernel's accept queue, a body held back by TCP while the server was busy, a hop
through a proxy. Under overload that time can be seconds, and a request whose caller has
already given up is then computed and answered ``200`` "in time" by the server's clock.

``X-Request-Start`` (HTTP header, or gRPC metadata of a unary call) carries the time the
request started, in Unix time, as routers and APM agents have long used it to measure
queueing before an application: ``t=1733500000.123`` (seconds, nginx's
``t=${msec}``), or the same instant in milliseconds, microseconds or nanoseconds, with or
without ``t=`` (told apart by magnitude). With ``trust_request_start`` on, the server
counts a request's deadline from that instant when it is earlier than the arrival it
stamped itself; a stamp later than the arrival changes nothing, so a stamp can shorten its
own request's deadline, never lengthen it. Meaningful only when the stamping clock and the
server's agree (a front end on the same host, or hosts kept in step by NTP): a client whose
clock runs ahead of the server's by more than its timeout has every request refused 504
``deadline_exceeded``, which is why it is off by default.

``Starts`` is the server's trust (``Services.starts``, None when off): it moves arrivals
and counts how long each stamped request waited before the server read it
(``actserve_request_start_wait_seconds``), the queueing before the application that APM
tools show from this header, otherwise invisible to the server.
"""

from __future__ import annotations

import time

HEADER = "x-request-start"
HEADER_BYTES = HEADER.encode()
STALE = ("the request's deadline (counted from when its bytes reached the server, or from "
         "its X-Request-Start where the server trusts that) passed before the server read "
         "its body; it was not computed")


def parse(value: bytes | str) -> float | None:
    """The stamp's Unix time in seconds; None when it is not one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if value.startswith("t="):
        value = value[2:]
    try:
        stamp = float(value)
    except ValueError:
        return None
    if not stamp > 0 or stamp == float("inf"):
        return None
    # seconds until the year 5138; then milliseconds, microseconds, nanoseconds
    for scale in (1.0, 1e3, 1e6, 1e9):
        if stamp < 1e11 * scale:
            return stamp / scale
    return None


def moved(arrived: float, value: bytes | str | None, wall=time.time,
          mono=time.monotonic) -> tuple[float, float | None]:
    """(``arrived`` (``mono``'s clock) moved back to the instant ``value`` stamps when that
    is earlier, the seconds the stamp says the request waited before ``arrived``: 0 for a
    later stamp, None without one)."""
    if value is None:
        return arrived, None
    stamp = parse(value)
    if stamp is None:
        return arrived, None
    started = mono() - (wall() - stamp)
    return (started, arrived - started) if started < arrived else (arrived, 0.0)


class Starts:
    """Arrivals moved back to trusted stamps, and the waits they show. ``observe``: the
    seconds each stamped request waited before the server read it (0 for a stamp later
    than its arrival), or None. Event loop only."""

    __slots__ = ("mono", "observe", "wall")

    def __init__(self, observe=None, wall=time.time, mono=time.monotonic) -> None:
        self.observe = observe
        self.wall, self.mono = wall, mono

    def apply(self, arrived: float, value: bytes | str | None) -> float:
        """``arrived`` moved back to the stamp ``value`` when earlier (``moved``), its wait
        counted."""
        arrived, wait = self.moved(arrived, value)
        self.count(wait)
        return arrived

    def moved(self, arrived: float, value: bytes | str | None) -> tuple[float, float | None]:
        """``moved`` on this object's clocks; the wait is not counted (``count``)."""
        return moved(arrived, value, self.wall, self.mono)

    def count(self, wait: float | None) -> None:
        """One stamped request's wait before the server read it (None: not stamped)."""
        if wait is not None and self.observe is not None:
            self.observe(wait)
