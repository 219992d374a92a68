"""The one place a finished request or batch is recorded: Prometheus metrics, the
``/v1/stats`` window and the v2 statistics. The HTTP layer calls ``request_started`` and
``record`` (once per activation request, after its answer), ``reject`` (once per refusal);
the engine's batch observer is ``observe_batch``. Event loop only: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service.engine.job import BatchReport, Job, JobResult
from service.errors import ActserveError
from service.observability.front_limits import FrontLimits
from service.observability.metrics import Metrics, status_class
from service.observability.model_stats import ModelStats
from service.observability.stats import WindowStats


class Recorder:
    def __init__(self, activations: list[str], *, metrics: bool, window_s: float,
                 front_delay_s: float = 0.05) -> None:
        self.metrics = Metrics(activations) if metrics else None
        self.stats = WindowStats(window_s)
        self.model_stats = ModelStats(activations)  # v2 statistics extension
        self.started = time.time()
        self.inflight = 0  # activation requests being handled
        self.front = FrontLimits(front_delay_s)  # a front end's limits (front_limits.py)
        if self.metrics is not None:
            self.metrics.inflight.set_function(lambda: self.inflight)
            self.metrics.track_front_limits(self.front.snapshot)

    def track(self, *, queue_depth: Callable[[], int], bodies_held: Callable[[], int],
              bodies_waiting: Callable[[], int], restarts: Callable[[], int],
              ready: Callable[[], bool], gpu_memory: Callable[[], list],
              fusion: Callable[[], dict] = dict) -> None:
        """Gauges read at scrape time from the components that own the numbers."""
        if self.metrics is None:
            return
        self.metrics.track_queue_depth(queue_depth)
        self.metrics.track_bodies(bodies_held, bodies_waiting)
        self.metrics.track_state(restarts, ready, gpu_memory, fusion)

    def request_started(self) -> None:
        """An activation request began; ``record`` ends it. A plain int read at scrape
        time: no lock on the request path."""
        self.inflight += 1

    def record(self, api: str, activation: str | None, status: int, *, total: float,
               decode: float = 0.0, encode: float = 0.0, job: Job | None = None,
               result: JobResult | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.model_stats.request(activation, status, total, result)
        self.inflight -= 1
        self.front.ended(bytes_in, status == 200, self.inflight)
        m = self.metrics
        if m is None:
            return
        label = m.activation_label(activation)
        if result is None:  # refused or failed: fewer series, looked up one by one
            c = m.child
            cls = status_class(status)
            c(m.requests, label, api, cls).inc()
            c(m.request_seconds, label, api, cls).observe(total)
            if job is not None:
                c(m.decode_seconds, api).observe(decode)
            c(m.bytes_in, api).inc(bytes_in)
            return
        s = m.answered(label, api, status)  # the hot path: one lookup for seven series
        s.requests.inc()
        s.seconds.observe(total)
        if job is not None:
            s.decode.observe(decode)
        s.bytes_in.inc(bytes_in)
        s.encode.observe(encode)
        s.bytes_out.inc(bytes_out)
        s.queue.observe(result.queue_s)
        saved = result.array.nbytes if job is not None and job.mode.inplace else 0
        if saved:
            m.inplace_saved.inc(saved)
        # a plain tuple in Sample's field order (see WindowStats.add)
        self.stats.add(label, (time.monotonic(), total, result.queue_s, result.compute_s,
                               job.numel if job else 0, result.batch_requests, saved,
                               result.batch_elements))

    def reject(self, error: ActserveError, stage: str | None = None) -> None:
        """Count a refused request, once, by reason; an overload refusal also by the
        ``stage`` it was made at (``metrics.STAGES``) when given."""
        if self.metrics is not None:
            self.metrics.reject(error.type, error.status, stage)

    def observe_batch(self, report: BatchReport, jobs: object = None) -> None:
        self.model_stats.batch(report)
        m = self.metrics
        if m is None:
            return
        label = m.activation_label(report.activation)
        c = m.child
        c(m.batches, label, report.device).inc()
        c(m.batch_requests, label).observe(report.requests)
        c(m.batch_elements, label).observe(report.elements)
        c(m.compute_seconds, label, report.device).observe(report.compute_s)
