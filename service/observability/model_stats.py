"""Cumulative per-model statistics in the shape of the KServe v2 / Triton statistics
extension (``GET /v2/models[/{m}]/stats``). Every activation is a model; both APIs count.

Counts and cumulative nanoseconds since start-up, updated on the event loop only:

* ``success`` / ``fail``: requests answered 2xx / otherwise, with their end-to-end time.
* ``queue``: time a successful request waited for its batch to start.
* ``compute_input`` / ``compute_infer`` / ``compute_output``: per successful request, the
  host-to-device copy, the activation, the device-to-host copy of its batch (on CPU the
  activation is applied to the request alone and the copies are zero).
* ``batch_stats``: per batch size (in requests), how many batches ran and their compute time.
* ``inference_count``: successful requests; ``execution_count``: batches executed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.engine.job import BatchReport, JobResult

NS = 1_000_000_000


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if seconds > 0:
            self.ns += int(seconds * NS + 0.5)

    def asdict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class _Model:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStat] = field(default_factory=dict)


class ModelStats:
    VERSION = "1"  # every model's one version (service/codecs/v2.py MODEL_VERSION)

    def __init__(self, names: list[str]) -> None:
        self._models = {name: _Model() for name in names}

    def add(self, name: str) -> None:
        """A model registered at run time (a custom activation)."""
        self._models.setdefault(name, _Model())

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def request(self, name: str | None, status: int, total_s: float,
                result: JobResult | None) -> None:
        """One answered request (either API)."""
        m = self._models.get(name) if name is not None else None
        if m is None:
            return
        if status >= 300 or result is None:
            m.fail.add(total_s)
            return
        m.success.add(total_s)
        m.inference_count += 1
        m.last_inference_ms = int(time.time() * 1000)
        m.queue.add(result.queue_s)
        m.compute_input.add(result.extra.get("h2d", 0.0))
        m.compute_infer.add(result.compute_s)
        m.compute_output.add(result.extra.get("d2h", 0.0))

    def batch(self, report: BatchReport) -> None:
        """One executed batch."""
        m = self._models.get(report.activation)
        if m is None:
            return
        m.execution_count += 1
        stat = m.batches.get(report.requests)
        if stat is None:
            stat = m.batches[report.requests] = BatchStat()
        stat.compute_input.add(report.h2d_s)
        stat.compute_infer.add(report.compute_s)
        stat.compute_output.add(report.d2h_s)

    def snapshot(self, name: str | None = None) -> dict:
        names = [name] if name is not None else list(self._models)
        return {"model_stats": [self._one(n, self._models[n]) for n in names]}

    def _one(self, name: str, m: _Model) -> dict:
        return {
            "name": name,
            "version": self.VERSION,
            "last_inference": m.last_inference_ms,
            "inference_count": m.inference_count,
            "execution_count": m.execution_count,
            "inference_stats": {
                "success": m.success.asdict(),
                "fail": m.fail.asdict(),
                "queue": m.queue.asdict(),
                "compute_input": m.compute_input.asdict(),
                "compute_infer": m.compute_infer.asdict(),
                "compute_output": m.compute_output.asdict(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": s.compute_input.asdict(),
                 "compute_infer": s.compute_infer.asdict(),
                 "compute_output": s.compute_output.asdict()}
                for size, s in sorted(m.batches.items())
            ],
            "memory_usage": [],
        }
