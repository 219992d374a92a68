"""How many requests a front end (nginx's ``limit_conn``) should let through to this server
at once, per size class, learned from the rate the queue really drains at
(docs/deployment.md, "Overload: let nginx refuse").

Little's law: requests in flight = the rate they are served at x the time each spends. To
keep a request's wait in the server near ``front_delay_ms``, a front end passes at most
``rate x delay`` of a class at once and refuses the rest itself, for a few microseconds
instead of the tenth of a served request a refusal costs in Python.

The rate comes from the executor's *cycles* only (``Admission.started``: dispatch to the
next dispatch while work waited), each request's share of its batch's cycle by elements:
under load that is what one request of the class costs the whole process (decoding,
answering, refusing, a front end on the same cores). Over each ``WINDOW_S`` in which the
executors were in such cycles ``BUSY_FRACTION`` of the time (saturated: with gaps between
cycles, the work the process did for their requests in the gaps is not in them, and the
rate read would be too high, twice the capacity at moderate load), with enough
requests, ``requests / their cycle seconds`` is the rate the class drained at; the
figure kept is the best of those, decaying by half over ``HALF_LIFE_S`` of measured windows
(so a slower machine brings it down). The best, not the latest: the rate grows with the
batches more requests in flight allow, so the rate measured at a low limit would hold the
limit low, and a quiet spell (small batches, each request costing more) would shrink it
just before the next flood. With nothing waiting there is no cycle and the figure holds.
Nothing measured yet: no limit (``None``), and a front end keeps what it was configured
with.

Classes follow the declared body size a front end can see: ``LARGE_BYTES`` and more is
large. The engine counts elements, so a request is large from ``LARGE_BYTES / 4``
elements (float32; a JSON body of the same elements is larger, so it is counted against
the large class's tighter limit sooner at the front end, never later).
"""

from __future__ import annotations

WINDOW_S = 1.0  # a rate is measured over this much time
WINDOW_MIN_REQUESTS = 16  # and from at least this many requests of the class
BUSY_FRACTION = 0.9  # in a window the executors were in cycles this much of the time
HALF_LIFE_S = 10.0  # the best rate halves over this many seconds of measured windows
LARGE_BYTES = 100_000  # the size classes' boundary, as nginx's map sees Content-Length
LARGE_ELEMENTS = LARGE_BYTES // 4
MIN_LIMIT = 4  # never fewer in flight: a batch's worth keeps the executor busy
MAX_LIMIT = 65_536
CLASSES = ("small", "large")


def size_name(elements: int) -> str:
    return "large" if elements >= LARGE_ELEMENTS else "small"


class FrontLimits:
    """Per size class, the best rate (requests per second of the executor's cycles) the
    queue drained at lately."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.rate: dict[str, float] = {}  # class -> best requests per cycle second
        self.windows = dict.fromkeys(CLASSES, 0)  # windows measured, per class
        self._since: float | None = None  # the current window's start
        self._seconds = dict.fromkeys(CLASSES, 0.0)
        self._requests = dict.fromkeys(CLASSES, 0)

    def observe(self, sizes: list[int], wall: float, now: float, executors: int = 1) -> None:
        """One executor cycle of ``wall`` seconds, ending at ``now``, that served requests
        of ``sizes`` elements (``executors``: how many cycle side by side)."""
        total = sum(sizes)
        if total <= 0 or wall <= 0:
            return
        if self._since is None:
            self._since = now - wall
        for n in sizes:
            name = size_name(n)
            self._seconds[name] += wall * n / total
            self._requests[name] += 1
        if now - self._since >= WINDOW_S:
            self._close(now - self._since, executors)
            self._since = now

    def _close(self, span: float, executors: int) -> None:
        decay = 0.5 ** (span / HALF_LIFE_S)
        busy = sum(self._seconds.values()) >= BUSY_FRACTION * span * executors
        for name in CLASSES:
            if busy and self._requests[name] >= WINDOW_MIN_REQUESTS and self._seconds[name] > 0:
                rate = self._requests[name] / self._seconds[name]
                self.rate[name] = max(rate, self.rate.get(name, 0.0) * decay)
                self.windows[name] += 1
            self._seconds[name], self._requests[name] = 0.0, 0

    def limit(self, name: str, executors: int) -> int | None:
        rate = self.rate.get(name)
        if rate is None:
            return None
        return max(MIN_LIMIT, min(MAX_LIMIT, round(self.delay_s * executors * rate)))

    def snapshot(self, executors: int) -> dict:
        return {"delay_ms": round(self.delay_s * 1000, 3), "large_bytes": LARGE_BYTES,
                **{name: {"limit": self.limit(name, executors),
                          "rate_per_s": (round(self.rate[name] * executors, 1)
                                         if name in self.rate else None),
                          "windows": self.windows[name]} for name in CLASSES}}


def merged(parts: list[dict]) -> dict | None:
    """Several workers' snapshots (each its own queue, the kernel spreading the load
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
