"""Sliding-window latency statistics per activation, for ``GET /v1/stats``: percentiles
without running Prometheus. Bounded in time (``window_s``) and in count (``max_samples``).

One sample per answered (2xx) request. Rates divide by the span the samples actually cover
(``covered_span``), not by the whole window. Batch sizes are request-weighted: the mean size of
the batch a request rode in. Event-loop only; nothing here is shared with a thread.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import numpy as np


class Sample(NamedTuple):
    """One answered request (the window keeps it as a plain tuple, see ``add``)."""

    t: float
    latency: float
    queue: float
    compute: float
    elements: int
    batch_requests: int
    inplace_saved: int
    batch_elements: int = 0


class WindowStats:
    def __init__(self, window_s: float, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self._samples: dict[str, deque[tuple]] = {}

    def add(self, activation: str, sample: tuple) -> None:
        """``sample``: a ``Sample`` or a plain tuple in its field order."""
        q = self._samples.get(activation)
        if q is None:
            q = self._samples[activation] = deque(maxlen=self.max_samples)
        # A plain tuple of numbers: the garbage collector stops tracking it at its first
        # collection, so a full window (up to max_samples per activation) adds nothing to
        # the full collections' walk. Kept as Sample objects (tracked), 50,000 of them made
        # every gen-2 pause longer and metrics-on serving ~10 % slower.
        q.append(tuple(sample))

    def snapshot(self) -> dict:
        return summarize(self.window(), self.window_s)

    def window(self) -> dict[str, np.ndarray]:
        """The samples still in the window, per activation: an (n, len(Sample)) float64
        array each (what ``summarize`` reads; several processes' windows concatenate)."""
        horizon = time.monotonic() - self.window_s
        out = {}
        for name, q in self._samples.items():
            while q and q[0][0] < horizon:
                q.popleft()
            if q:
                out[name] = np.array(q, dtype=np.float64)
        return out


MIN_SPAN_S = 1.0


def covered_span(since_oldest: float, window_s: float) -> float:
    """The seconds the rates divide by: from this activation's oldest sample still in the
    window to now, so a load that began 10 s ago reads as its real rate, not as that rate
    diluted over the whole window. At least ``MIN_SPAN_S`` (a lone request just answered is
    1 req/s, not thousands), at most the window."""
    return min(window_s, max(since_oldest, MIN_SPAN_S, 1e-9))


def summarize(windows: dict[str, np.ndarray], window_s: float) -> dict:
    """The ``/v1/stats`` figures of each activation's samples (rows of ``Sample`` fields;
    several processes' windows concatenate: their clocks are the same monotonic clock)."""
    out = {}
    now = time.monotonic()
    for name, rows in windows.items():
        if not len(rows):
            continue
        col = dict(zip(Sample._fields, rows.T, strict=True))
        span = covered_span(now - float(col["t"].min()), window_s)
        out[name] = {
            "requests": len(rows),
            "window_s": round(span, 3),
            "requests_per_s": round(len(rows) / span, 3),
            "elements_per_s": round(float(col["elements"].sum()) / span, 3),
            "mean_batch_requests": round(float(col["batch_requests"].mean()), 3),
            "mean_batch_elements": round(float(col["batch_elements"].mean()), 3),
            "inplace_saved_bytes": int(col["inplace_saved"].sum()),
            "latency_ms": _percentiles(col["latency"]),
            "queue_ms": _percentiles(col["queue"]),
            "compute_ms": _percentiles(col["compute"]),
        }
    return out


def _percentiles(values: np.ndarray) -> dict:
    """Milliseconds, to the microsecond."""
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1000
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(values.max() * 1000), 3)}
