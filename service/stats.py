"""Sliding-window latency statistics per activation, for ``GET /v1/stats``: percentiles
without running Prometheus. Bounded in time (``window_s``) and in count (``max_samples``).

One sample per answered (2xx) request. Batch sizes are request-weighted: the mean size of
the batch a request rode in. Event-loop only; nothing here is shared with a thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Sample:
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
        self._samples: dict[str, deque[Sample]] = {}
        self.started = time.monotonic()

    def add(self, activation: str, sample: Sample) -> None:
        q = self._samples.get(activation)
        if q is None:
            q = self._samples[activation] = deque(maxlen=self.max_samples)
        q.append(sample)

    def snapshot(self) -> dict:
        now = time.monotonic()
        horizon = now - self.window_s
        span = min(self.window_s, now - self.started) or 1e-9
        out = {}
        for name, q in self._samples.items():
            while q and q[0].t < horizon:
                q.popleft()
            if not q:
                continue
            lat = np.fromiter((s.latency for s in q), float, len(q))
            que = np.fromiter((s.queue for s in q), float, len(q))
            comp = np.fromiter((s.compute for s in q), float, len(q))
            elements = sum(s.elements for s in q)
            out[name] = {
                "requests": len(q),
                "window_s": round(span, 3),
                "requests_per_s": round(len(q) / span, 3),
                "elements_per_s": round(elements / span, 3),
                "mean_batch_requests": round(float(np.mean([s.batch_requests for s in q])), 3),
                "mean_batch_elements": round(float(np.mean([s.batch_elements for s in q])), 3),
                "inplace_saved_bytes": sum(s.inplace_saved for s in q),
                "latency_ms": _percentiles(lat),
                "queue_ms": _percentiles(que),
                "compute_ms": _percentiles(comp),
            }
        return out


def _percentiles(values: np.ndarray) -> dict:
    """Milliseconds, to the microsecond."""
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1000
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(values.max() * 1000), 3)}
