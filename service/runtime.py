"""Everything one server process owns, built from ``Settings`` by ``create_app``."""

from __future__ import annotations

import asyncio
import logging
import time

from .activations import Registry
from .batcher import Batcher
from .capabilities import Capabilities
from .errors import ActserveError
from .executor import executors_for, resolve_devices
from .job import Job, JobResult
from .metrics import Metrics, status_class
from .model_stats import ModelStats
from .options import JobFactory
from .pool import ExecutorPool
from .settings import Settings
from .stats import Sample, WindowStats

log = logging.getLogger("actserve")

REJECT_REASON = {400: "invalid", 401: "unauthorized", 404: "not_found", 413: "too_large",
                 415: "unsupported_media", 500: "compute"}


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.capabilities = Capabilities()
        self.devices = resolve_devices(settings.device)
        self.pool = ExecutorPool(
            executors_for(self.devices, settings.torch_threads, settings.fault_injection),
            self.registry, self.capabilities, restart_limit=settings.executor_restart_limit,
        )
        self.batcher = Batcher(settings, self.pool)
        self.jobs = JobFactory(settings, self.capabilities)
        self.metrics = Metrics(self.registry.names()) if settings.metrics else None
        self.stats = WindowStats(settings.metrics_window_s)
        self.model_stats = ModelStats(self.registry.names())  # v2 statistics extension
        self.batcher.on_batch = self._observe_batch
        self.started = time.time()
        self._restarts_seen = 0
        if self.metrics is not None:
            self.metrics.track_queue_depth(lambda: self.batcher.waiting)
            self.batcher.on_batch = self._observe_batch
            self.batcher.on_reject = self._observe_reject

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.batcher.start()
        if not self.pool.ready:
            log.error("not ready after warm-up: %s", self.pool.selftest_problems)

    async def drain(self) -> None:
        await self.batcher.drain()

    async def stop(self) -> None:
        await self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.pool.ready and not self.batcher.draining

    # -- the request path ---------------------------------------------------------------
    async def run(self, job: Job) -> JobResult:
        fut = self.batcher.submit(job)
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # the batcher skips it if it has not started
            raise

    def record(self, api: str, activation: str | None, status: int, *, total: float,
               decode: float = 0.0, encode: float = 0.0, job: Job | None = None,
               result: JobResult | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.model_stats.request(activation, status, total, result)
        m = self.metrics
        if m is None:
            return
        label = m.activation_label(activation)
        cls = status_class(status)
        m.requests.labels(label, api, cls).inc()
        m.request_seconds.labels(label, api, cls).observe(total)
        m.decode_seconds.labels(api).observe(decode)
        m.bytes_in.labels(api).inc(bytes_in)
        if result is not None:
            m.encode_seconds.labels(api).observe(encode)
            m.bytes_out.labels(api).inc(bytes_out)
            m.queue_seconds.labels(label).observe(result.queue_s)
            saved = result.array.nbytes if job is not None and job.mode.inplace else 0
            if saved:
                m.inplace_saved.inc(saved)
            self.stats.add(label, Sample(time.monotonic(), total, result.queue_s,
                                         result.compute_s, job.numel if job else 0,
                                         result.batch_requests, saved))

    def reject(self, error: ActserveError) -> None:
        """Count a refusal that happened before the batcher saw the request."""
        if self.metrics is not None and error.status in REJECT_REASON:
            self.metrics.rejections.labels(REJECT_REASON[error.status]).inc()

    def sync_metrics(self) -> None:
        """Bring state-derived metrics up to date before an exposition."""
        m = self.metrics
        if m is None:
            return
        if self.pool.restarts > self._restarts_seen:
            m.restarts.inc(self.pool.restarts - self._restarts_seen)
            self._restarts_seen = self.pool.restarts
        for ex in self.pool.executors:
            if ex.device.startswith("cuda"):
                m.gpu_allocated.labels(ex.device).set(ex.memory_allocated)
                m.gpu_peak.labels(ex.device).set(ex.memory_peak)

    # -- observers (event loop) --------------------------------------------------------
    def _observe_batch(self, jobs: list[Job], results: list, wall: float) -> None:
        self.model_stats.batch(jobs, results, wall)
        m = self.metrics
        if m is None or not jobs:
            return
        label = m.activation_label(jobs[0].activation.name)
        ok = [r for r in results if isinstance(r, JobResult)]
        device = ok[0].device if ok else "unknown"
        m.batches.labels(label, device).inc()
        m.batch_requests.labels(label).observe(len(jobs))
        m.batch_elements.labels(label).observe(sum(j.numel for j in jobs))
        # CUDA: the batch's CUDA-event time; CPU: the compute thread's wall time.
        compute = ok[0].compute_s if ok and device.startswith("cuda") else wall
        m.compute_seconds.labels(label, device).observe(compute)

    def _observe_reject(self, reason: str, _job: Job | None) -> None:
        self.metrics.rejections.labels(reason).inc()
