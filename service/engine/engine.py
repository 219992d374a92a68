"""The engine of one server process: the activation registry, the capability table, the
executors of its devices, the batcher that feeds them, and the factory that turns decoded
requests into jobs. Built from ``Settings``; knows nothing of HTTP or metrics.

The HTTP layer uses it through a handful of calls: ``jobs.build`` (validate), ``admit``
(cheap overload check before a body is read), ``submit`` (queue; a future), ``abandon``
(the client went away), ``begin_drain``/``drain``/``stop``, and the read-only state below.
Observers subscribe to finished batches with ``observe_batches``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.engine import selftest
from service.engine.activations import Activation, Registry
from service.engine.batcher import Batcher
from service.engine.capabilities import Capabilities
from service.engine.executor import executors_for, resolve_devices
from service.engine.executor_protocol import ExecutorLike
from service.engine.job import BatchReport, Job
from service.engine.jobs import JobFactory
from service.engine.pool import ExecutorPool
from service.errors import Conflict, InvalidRequest
from service.settings import Settings

log = logging.getLogger("actserve")


class Engine:
    def __init__(self, settings: Settings, executors: list[ExecutorLike] | None = None) -> None:
        self.settings = settings
        self.registry = Registry()
        self.capabilities = Capabilities()
        self.devices = resolve_devices(settings.device)
        if executors is None:
            executors = executors_for(self.devices, settings.torch_threads,
                                      settings.fault_injection)
        self.pool = ExecutorPool(executors, self.registry, self.capabilities,
                                 restart_limit=settings.executor_restart_limit)
        self.batcher = Batcher(settings, self.pool)
        self.jobs = JobFactory(settings, self.capabilities)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.batcher.start()
        if not self.pool.ready:
            log.error("not ready after warm-up: %s", self.pool.selftest_problems)

    async def drain(self) -> None:
        await self.batcher.drain()

    async def stop(self) -> None:
        await self.batcher.stop()

    def begin_drain(self) -> None:
        """Refuse new work from now on (503); accepted work still completes."""
        self.batcher.begin_drain()

    # -- state ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.pool.ready and not self.batcher.draining

    @property
    def draining(self) -> bool:
        return self.batcher.draining

    def not_ready_reason(self) -> str:
        if self.batcher.draining:
            return "draining"
        if self.pool.selftest_problems:
            return "self-test failed: " + "; ".join(self.pool.selftest_problems[:5])
        return "warming up or restarting the compute executor"

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet dispatched."""
        return self.batcher.waiting

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def gpu_memory(self) -> list[tuple[str, int, int]]:
        """(device, bytes allocated, peak bytes) of each CUDA executor."""
        return [(ex.device, ex.memory_allocated, ex.memory_peak)
                for ex in self.pool.executors if ex.device.startswith("cuda")]

    def observe_batches(self, observer: Callable[[BatchReport, list[Job]], None]) -> None:
        """Call ``observer(report, jobs)`` on the event loop after every executed batch,
        before the batch's futures' callbacks run."""
        self.batcher.on_batch = lambda jobs, results, wall: (
            observer(BatchReport.of(jobs, results, wall), jobs) if jobs else None)

    # -- custom activations (custom.py) ------------------------------------------------
    async def register(self, activation: Activation) -> None:
        """Probe and self-test ``activation`` in every running compute thread (never on the
        loop), then serve it. InvalidRequest (400) naming the problem if it fails."""
        if activation.name in self.registry:
            raise Conflict(f"activation {activation.name!r} exists; DELETE it first "
                           "(custom ones only)")
        alone = Registry({activation.name: activation})
        for ex in [e for e in self.pool.executors if e.alive]:
            failures = await asyncio.wrap_future(ex.call(lambda c: selftest.probe(c, alone)))
            self.capabilities.record(failures)
            problems = await asyncio.wrap_future(
                ex.call(lambda c: selftest.self_test(c, alone, self.capabilities)))
            if problems:
                self.capabilities.forget(activation.name)
                raise InvalidRequest(f"{activation.name} failed its self-test on {ex.device}: "
                                     + "; ".join(problems[:3]))
        if activation.name in self.registry:  # registered meanwhile by another request
            raise Conflict(f"activation {activation.name!r} exists")
        self.registry.add(activation)

    def unregister(self, name: str) -> None:
        act = self.registry.get(name)  # 404 when unknown
        if not getattr(act, "expression", None):
            raise InvalidRequest(f"{name} is built in; only custom activations can be deleted")
        self.registry.remove(name)
        self.capabilities.forget(name)

    # -- the request path ---------------------------------------------------------------
    def admit(self) -> None:
        """Raise what ``submit`` would raise for overload, before a body is read."""
        self.batcher.admit()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the future resolves exactly once (see ``Batcher``)."""
        return self.batcher.submit(job)

    def abandon(self, job: Job) -> None:
        """The client went away: never compute ``job`` if it has not started."""
        self.batcher.abandon(job)
