"""How many requests a front end (nginx's ``limit_conn``) should let through to this server
at once, per size class, learned from the rate the server answers them at while it is
saturated (docs/deployment.md, "Overload: let nginx refuse").

Little's law: requests in flight = the rate they are served at x the time each spends. To
keep a request's time in the server near ``front_delay_ms``, a front end passes at most
``rate x delay`` of a class at once and refuses the rest itself, for a few microseconds
instead of the tenth of a served request a refusal costs in Python.

The rate is what the server answered (200s, counted by the recorder as each request ends)
over windows of ``WINDOW_S`` in which it was never without a request in hand: saturated,
so the rate is what it *can* serve (its parsing, computing and answering, and whatever
shares its cores, a front end included), not what it was offered. A window in which the
requests in hand fell to zero once is not counted (a server with slack reads the load,
not its capacity), nor one with fewer than ``WINDOW_MIN_REQUESTS`` of a class. The figure
kept is the best window, halving over ``HALF_LIFE_S`` of measured windows: the best, not the
latest, because the rate grows with the batches more requests in flight allow (the rate
read at a low limit would hold the limit low), and decaying so that a slower machine
brings it down. Nothing measured yet: no limit (``None``); a front end keeps what it was
configured with.

Classes follow the body size a front end sees (``Content-Length``): ``LARGE_BYTES`` and
more is large. Each process measures its own answers; with several workers the limits
add up (``merged``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 1.0  # a rate is measured over this much time
WINDOW_MIN_REQUESTS = 16  # and from at least this many answers of the class
HALF_LIFE_S = 10.0  # the best rate halves over this many seconds of measured windows
LARGE_BYTES = 100_000  # the size classes' boundary, as nginx's map sees Content-Length
MIN_LIMIT = 4  # never fewer in flight: a batch's worth keeps the executor busy
MAX_LIMIT = 65_536
CLASSES = ("small", "large")


def size_name(nbytes: int) -> str:
    return "large" if nbytes >= LARGE_BYTES else "small"


class FrontLimits:
    """Per size class, the best rate the server answered at while saturated."""

    def __init__(self, delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay_s = delay_s
        self.clock = clock
        self.rate: dict[str, float] = {}  # class -> best answers a second, saturated
        self.windows = dict.fromkeys(CLASSES, 0)  # windows measured, per class
        self._since: float | None = None  # the current window's start
        self._slack = False  # the requests in hand fell to zero in the current window
        self._served = dict.fromkeys(CLASSES, 0)

    def ended(self, nbytes: int, served: bool, in_hand: int) -> None:
        """A request ended: ``served`` (answered 200) with a body of ``nbytes``;
        ``in_hand``: the requests the server still handles."""
        now = self.clock()
        if self._since is None:
            self._since = now
        if served:
            self._served[size_name(nbytes)] += 1
        if now - self._since >= WINDOW_S:
            self._close(now - self._since)
            self._since = now
        if in_hand == 0:
            self._slack = True

    def _close(self, span: float) -> None:
        saturated = not self._slack and span < 2 * WINDOW_S
        decay = 0.5 ** (span / HALF_LIFE_S)
        for name in CLASSES:
            if saturated and self._served[name] >= WINDOW_MIN_REQUESTS:
                self.rate[name] = max(self._served[name] / span,
                                      self.rate.get(name, 0.0) * decay)
                self.windows[name] += 1
            self._served[name] = 0
        self._slack = False

    def limit(self, name: str) -> int | None:
        rate = self.rate.get(name)
        if rate is None:
            return None
        return max(MIN_LIMIT, min(MAX_LIMIT, round(self.delay_s * rate)))

    def snapshot(self) -> dict:
        return {"delay_ms": round(self.delay_s * 1000, 3), "large_bytes": LARGE_BYTES,
                **{name: {"limit": self.limit(name),
                          "rate_per_s": (round(self.rate[name], 1) if name in self.rate
                                         else None),
                          "windows": self.windows[name]} for name in CLASSES}}


def merged(parts: list[dict | None]) -> dict | None:
    """Several workers' snapshots (each answers its share, the kernel spreading the load
    between them): each class's limit is their sum; ``None`` where none has measured."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    out = {"delay_ms": parts[0]["delay_ms"], "large_bytes": parts[0]["large_bytes"]}
    for name in CLASSES:
        limits = [p[name]["limit"] for p in parts if p[name]["limit"] is not None]
        # a worker not measured yet is taken to serve as the measured ones do
        out[name] = {"limit": round(sum(limits) * len(parts) / len(limits)) if limits else None,
                     "windows": sum(p[name]["windows"] for p in parts),
                     "workers_measured": len(limits)}
    return out
