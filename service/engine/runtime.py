"""Everything one server process owns, built from ``Settings`` by ``create_app``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect

from service.engine.activations import Registry
from service.engine.batcher import Batcher
from service.engine.capabilities import Capabilities
from service.engine.executor import executors_for, resolve_devices
from service.engine.job import Job, JobResult
from service.engine.jobs import JobFactory
from service.engine.pool import ExecutorPool
from service.errors import ActserveError
from service.http.body_budget import BodyBudget
from service.observability.metrics import Metrics, status_class
from service.observability.model_stats import ModelStats
from service.observability.stats import WindowStats
from service.settings import Settings

log = logging.getLogger("actserve")

Receive = Callable[[], Awaitable[dict]]
WATCH_AFTER_S = 0.5  # a job waiting longer than this gets a disconnect watcher


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
        self.bodies = BodyBudget(settings.max_body_bytes_in_flight)
        self.metrics = Metrics(self.registry.names()) if settings.metrics else None
        self.stats = WindowStats(settings.metrics_window_s)
        self.model_stats = ModelStats(self.registry.names())  # v2 statistics extension
        self.batcher.on_batch = self._observe_batch
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self.inflight = 0  # activation requests being handled
        if self.metrics is not None:
            self.metrics.track_queue_depth(lambda: self.batcher.waiting)
            self.metrics.track_bodies(lambda: self.bodies.held, lambda: self.bodies.waiting)
            self.metrics.inflight.set_function(lambda: self.inflight)
            self.metrics.track_state(lambda: self.pool.restarts, lambda: self.ready,
                                     self._gpu_memory)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
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
    async def run(self, job: Job, receive: Receive | None = None) -> JobResult:
        """Queue ``job`` and wait for its answer. With the ASGI ``receive`` channel (the body
        already read), a client that disconnects while its job waits frees its queue slot at
        once and its work is skipped if not yet started (``ClientDisconnect`` is raised).
        The disconnect watcher starts only once a job has waited ``WATCH_AFTER_S``: most
        answers come sooner, and then no watcher task is ever created."""
        fut = self.batcher.submit(job)
        watch: list[asyncio.Task] = []

        def start_watch() -> None:
            w = asyncio.ensure_future(_until_disconnect(receive))
            w.add_done_callback(lambda t: t.cancelled() or self.batcher.abandon(job))
            watch.append(w)

        timer = self.loop.call_later(WATCH_AFTER_S, start_watch) if receive is not None else None
        try:
            return await fut
        except asyncio.CancelledError:
            self.batcher.abandon(job)  # the batcher skips it if it has not started
            if watch and watch[0].done() and not watch[0].cancelled():
                raise ClientDisconnect() from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watch:
                watch[0].cancel()

    def request_started(self) -> None:
        """An activation request entered ``exchange.handle``; ``record`` ends it. A plain
        int read at scrape time: no lock on the request path."""
        self.inflight += 1

    def record(self, api: str, activation: str | None, status: int, *, total: float,
               decode: float = 0.0, encode: float = 0.0, job: Job | None = None,
               result: JobResult | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.model_stats.request(activation, status, total, result)
        self.inflight -= 1
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

    def reject(self, error: ActserveError) -> None:
        """Count a refused request, once, by reason (every refusal reaches the caller of
        ``run`` as an ``ActserveError``: decode, queue full, deadline, compute, ...)."""
        if self.metrics is not None:
            self.metrics.reject(error.type, error.status)

    def _gpu_memory(self) -> list[tuple[str, int, int]]:
        return [(ex.device, ex.memory_allocated, ex.memory_peak)
                for ex in self.pool.executors if ex.device.startswith("cuda")]

    # -- observers (event loop) --------------------------------------------------------
    def _observe_batch(self, jobs: list[Job], results: list, wall: float) -> None:
        self.model_stats.batch(jobs, results, wall)
        m = self.metrics
        if m is None or not jobs:
            return
        label = m.activation_label(jobs[0].activation.name)
        ok = next((r for r in results if isinstance(r, JobResult)), None)
        device = ok.device if ok is not None else "unknown"
        c = m.child
        c(m.batches, label, device).inc()
        c(m.batch_requests, label).observe(len(jobs))
        # every result of a batch carries the batch's element count
        elements = ok.batch_elements if ok is not None else sum(j.numel for j in jobs)
        c(m.batch_elements, label).observe(elements)
        # CUDA: the batch's CUDA-event time; CPU: the compute thread's wall time.
        compute = ok.compute_s if ok is not None and device.startswith("cuda") else wall
        c(m.compute_seconds, label, device).observe(compute)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
