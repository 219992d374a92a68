"""The executors of this process: start-up self-test, least-loaded choice, death and
restart, readiness. Loop side only; torch work is sent to the executors' threads.

The pool needs of an executor only ``ExecutorLike`` (executor_protocol.py); where a fresh
one comes from after a death (``new_executor``) and the start-up checks run in each
executor (``probe``, ``self_test``) are parameters, so the scheduler can be driven alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.engine import selftest
from service.engine.activations import Registry
from service.engine.capabilities import Capabilities
from service.engine.executor import replacement
from service.engine.executor_protocol import ExecutorFactory, ExecutorLike
from service.engine.job import Job, JobResult
from service.errors import Unavailable

log = logging.getLogger("actserve.pool")

DoneHook = Callable[[ExecutorLike, list[Job], list[JobResult | Exception], float], None]
DeathHook = Callable[[ExecutorLike, list[Job], Exception], None]
# Start-up checks, run in an executor with its compute object (see selftest.py).
Probe = Callable[[object, Registry], dict[tuple, str]]
SelfTest = Callable[[object, Registry, Capabilities], list[str]]


class ExecutorPool:
    def __init__(
        self,
        executors: list[ExecutorLike],
        registry: Registry,
        capabilities: Capabilities,
        *,
        restart_limit: int = 5,
        new_executor: ExecutorFactory = replacement,
        probe: Probe = selftest.probe,
        self_test: SelfTest = selftest.self_test,
    ) -> None:
        self.executors = executors
        self.new_executor = new_executor
        self._probe = probe
        self._self_test = self_test
        self.registry = registry
        self.capabilities = capabilities
        self.restart_limit = restart_limit
        self.restarts = 0
        self.selftest_problems: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._free = asyncio.Event()
        self._on_done: DoneHook | None = None
        self._on_lost: DeathHook | None = None
        self._ready: set[int] = set()
        self._restarting: set[asyncio.Task] = set()
        self.on_readiness_change: Callable[[bool], None] | None = None

    # -- lifecycle --------------------------------------------------------------------
    async def start(self, on_done: DoneHook, on_lost: DeathHook) -> None:
        self.loop = asyncio.get_running_loop()
        self._on_done, self._on_lost = on_done, on_lost
        for ex in self.executors:
            await self._start_one(ex)

    async def _start_one(self, ex: ExecutorLike) -> None:
        ex.start(self.loop, self._batch_done, self._executor_died)
        failures = await asyncio.wrap_future(ex.call(lambda c: self._probe(c, self.registry)))
        self.capabilities.record(failures)
        problems = await asyncio.wrap_future(
            ex.call(lambda c: self._self_test(c, self.registry, self.capabilities))
        )
        self.selftest_problems = problems
        if problems:
            log.error("self-test failed on %s: %s", ex.device, problems)
            return
        self._ready.add(ex.index)
        self._free.set()
        self._notify()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for ex in self.executors:
            await loop.run_in_executor(None, ex.stop)
        self._ready.clear()

    # -- readiness --------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._ready) and not self.selftest_problems

    def _notify(self) -> None:
        if self.on_readiness_change is not None:
            self.on_readiness_change(self.ready)

    # -- dispatch ---------------------------------------------------------------------
    def idle(self) -> ExecutorLike | None:
        """The least-loaded ready executor with no batch in flight, if any."""
        best = None
        for ex in self.executors:
            if ex.index in self._ready and ex.inflight_batches == 0:
                if best is None or ex.inflight_elements < best.inflight_elements:
                    best = ex
        return best

    async def wait_idle(self) -> ExecutorLike:
        while True:
            ex = self.idle()
            if ex is not None:
                return ex
            self._free.clear()
            await self._free.wait()

    def busy(self) -> bool:
        return any(ex.inflight_batches for ex in self.executors)

    # -- callbacks from compute threads (run on the loop) ------------------------------
    def _batch_done(self, ex: ExecutorLike, jobs: list[Job], results: list, wall: float) -> None:
        ex.inflight_batches -= 1
        ex.inflight_elements -= sum(j.numel for j in jobs)
        self._free.set()
        self._on_done(ex, jobs, results, wall)

    def _executor_died(self, ex: ExecutorLike, jobs: list[Job], exc: BaseException) -> None:
        if jobs:
            ex.inflight_batches -= 1
            ex.inflight_elements -= sum(j.numel for j in jobs)
        first_report = ex.alive
        ex.alive = False
        if first_report:
            log.error("compute thread for %s died: %r", ex.device, exc)
            self._ready.discard(ex.index)
            self._notify()
        err = Unavailable("the compute executor failed while holding this request; retry")
        self._on_lost(ex, jobs, err)
        if not first_report:
            return  # several pending batches report one death; restart once
        if self.restarts >= self.restart_limit:
            log.error("executor restart limit (%d) reached; staying not ready", self.restart_limit)
            return
        self.restarts += 1
        fresh = self.new_executor(ex)
        self.executors[self.executors.index(ex)] = fresh
        task = self.loop.create_task(self._start_one(fresh))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)
