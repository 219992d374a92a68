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

from service.engine import custom, fusion, selftest
from service.engine.activations import INLINE, Activation, Registry
from service.engine.admission import Hint
from service.engine.batcher import Batcher
from service.engine.capabilities import Capabilities
from service.engine.device_regions import DeviceRegionsHost
from service.engine.executor import executors_for, resolve_devices
from service.engine.executor_protocol import ExecutorLike
from service.engine.inline import ExpressionCache
from service.engine.job import BatchReport, Job
from service.engine.jobs import JobFactory
from service.engine.pool import ExecutorPool
from service.errors import Conflict, InvalidRequest, NotReady
from service.settings import Settings

log = logging.getLogger("actserve")
MAX_CUSTOM = 256  # custom activations registered at once (each is probed, listed, compiled)


class Engine:
    """The inline engine: this process's own compute threads (``protocol.EngineProtocol``)."""

    mode = "inline"
    shows_overload = True  # each worker's inline engine has its own queue to show

    def __init__(self, settings: Settings, executors: list[ExecutorLike] | None = None) -> None:
        self.settings = settings
        self.on_custom: Callable[[str, bool], None] | None = None  # (name, added)
        self.registry = Registry()
        self.capabilities = Capabilities()
        self.devices = resolve_devices(settings.device)
        if executors is None:
            executors = executors_for(self.devices, settings.torch_threads,
                                      settings.fault_injection)
        self.pool = ExecutorPool(executors, self.registry, self.capabilities,
                                 restart_limit=settings.executor_restart_limit)
        self.batcher = Batcher(settings, self.pool)
        self.expressions = ExpressionCache(self.check_activation,
                                           on_evict=self.capabilities.forget)
        self.jobs = JobFactory(settings, self.capabilities, self.expressions.resolve)
        self._accuracy: dict[tuple[str, int], dict] = {}
        self.fuser = fusion.Fuser(settings.fusion, self.devices[0])
        self.device_regions = DeviceRegionsHost(self)  # CUDA shared memory (cuda_ipc.py)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.batcher.start()
        if not self.pool.ready:
            log.error("not ready after warm-up: %s", self.pool.selftest_problems)
        if self.settings.warm_autograd:
            # before the server says it is ready: an import of seconds holds the GIL in
            # bursts, which would stall the event loop right after readiness otherwise
            await asyncio.to_thread(_warm_autograd)

    async def drain(self) -> None:
        await self.batcher.drain()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.device_regions.close_all()

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

    # -- custom activations (custom.py, inline.py) ---------------------------------------
    async def check_activation(self, activation: Activation) -> str | None:
        """Probe and self-test ``activation`` in every running compute thread (never on the
        loop); the first problem, or None."""
        alone = Registry({activation.name: activation})
        alive = [e for e in self.pool.executors if e.alive]
        if not alive:
            raise NotReady("no compute executor is running to test the activation; retry")
        for ex in alive:
            failures = await asyncio.wrap_future(ex.call(lambda c: selftest.probe(c, alone)))
            self.capabilities.record(failures)
            try:
                problems = await asyncio.wrap_future(
                    ex.call(lambda c: selftest.self_test(c, alone, self.capabilities)))
            except Exception as exc:  # noqa: BLE001 - the activation's problem, a 400
                problems = [f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]
            if problems:
                self.capabilities.forget(activation.name)
                return f"on {ex.device}: " + "; ".join(problems[:3])
        return None

    async def register(self, activation: Activation) -> None:
        """Serve ``activation`` once its checks pass; InvalidRequest (400) naming the
        problem if not, Conflict (409) if the name is taken."""
        if activation.name in self.registry:
            raise Conflict(f"activation {activation.name!r} exists; DELETE it first "
                           "(custom ones only)")
        customs = sum(1 for a in self.registry if getattr(a, "expression", None) is not None)
        if customs >= MAX_CUSTOM:
            raise InvalidRequest(f"at most {MAX_CUSTOM} custom activations may be registered; "
                                 "DELETE one first")
        problem = await self.check_activation(activation)
        if problem:
            raise InvalidRequest(f"{activation.name} failed its self-test {problem}")
        if activation.name in self.registry:  # registered meanwhile by another request
            raise Conflict(f"activation {activation.name!r} exists")
        decided = self.fuser.attach(activation)  # compiled in the fusion thread (fusion.py)
        if decided is not None:  # served once decided: its form never changes while it lives
            await asyncio.wrap_future(decided)
            if activation.name in self.registry:
                raise Conflict(f"activation {activation.name!r} exists")
        self.registry.add(activation)

    def fusion_outcomes(self) -> dict[str, int]:
        """Fusion decisions by outcome (fusion.OUTCOMES), for /metrics."""
        return self.fuser.outcomes()

    def unregister(self, name: str) -> None:
        act = self.registry.get(name)  # 404 when unknown
        if act is INLINE or not getattr(act, "expression", None):
            raise InvalidRequest(f"{name} is built in; only custom activations can be deleted")
        self.registry.remove(name)
        self.capabilities.forget(name)

    # -- the one registration path (protocol.EngineProtocol; RemoteEngine forwards) -------
    async def register_custom(self, raw: object, activation: Activation | None = None) -> dict:
        """Register a custom activation from its raw spec (built here unless the caller
        built it already); its catalogue entry. ``on_custom`` hears of it."""
        activation = activation if activation is not None else custom.build(raw)
        await self.register(activation)  # 400 on a failed self-test, 409 if taken
        if self.on_custom is not None:
            self.on_custom(activation.name, True)
        return activation.describe()

    async def unregister_custom(self, name: str) -> None:
        self.unregister(name)  # 404 unknown, 400 built in
        if self.on_custom is not None:
            self.on_custom(name, False)

    async def load_file(self, path: str) -> list[str]:
        """``--activations-file``: every entry registered, or the first problem raised
        (start-up stops with it)."""
        names = []
        for raw, where in custom.file_entries(path):
            names.append((await self.register_custom(raw, custom.build(raw, where)))["name"])
        return names

    # -- CUDA shared memory (device_regions.py) ------------------------------------------
    async def open_cuda_region(self, name: str, raw: bytes, device_id: int,
                               byte_size: int) -> None:
        await self.device_regions.open(name, raw, device_id, byte_size)

    async def close_cuda_region(self, name: str) -> None:
        await self.device_regions.close(name)

    # -- the lab (docs/lab.md) -------------------------------------------------------------
    async def accuracy(self, name: str) -> dict:
        """The accuracy table of ``name`` (``numerics.sweep``), computed once per activation
        in a compute thread, on that thread's device."""
        act = self.registry.get(name)  # 404 when unknown
        if act is INLINE:
            raise InvalidRequest("the expr activation has no table of its own; register the "
                                 "expression (POST /v1/activations) and ask for that")
        key = (act.name, id(act))
        if key not in self._accuracy:
            alive = [e for e in self.pool.executors if e.alive]
            if not alive:
                raise NotReady("no compute executor is running; retry")
            ex = alive[0]

            def refuse(wire: str, mode) -> str | None:
                try:
                    self.capabilities.check(act, wire, mode)
                except InvalidRequest as exc:
                    return str(exc)
                return None

            from service.engine import numerics  # torch-side, loaded on first use

            rows, platform = await asyncio.wrap_future(ex.call(
                lambda c: (numerics.sweep(act, c.device, refuse), numerics.platform(c.device))))
            self._accuracy = {k: v for k, v in self._accuracy.items() if k[0] != act.name}
            self._accuracy[key] = {"activation": act.name, "device": ex.device,
                                   "platform": platform, "grid": numerics.GRID_DOC,
                                   "rows": rows}
        return self._accuracy[key]

    # -- the request path ---------------------------------------------------------------
    def admit(self, hint: Hint | None = None) -> None:
        """Raise what ``submit`` would raise for overload, before a body is read; with a
        ``hint`` (``admission.hint_from``) the predicted finish and the client's share
        too."""
        self.batcher.admit(hint)

    def busy(self) -> bool:
        """The queue is full, or a new request's predicted wait stands above the target
        delay: the HTTP protocol then checks ``admit`` before the application runs
        (``service/http/shed.py``)."""
        return self.batcher.busy()

    def predicted_wait(self) -> float:
        """Seconds a new request of priority 0 would wait now (``Admission.wait_ahead``);
        the engine process sends it with every answer (``admission.RemoteWait``)."""
        return self.batcher.admission.wait_ahead(0)

    def overload(self) -> dict:
        """The overload policy's state (``admission.Admission.snapshot``), for /metrics."""
        return self.batcher.admission.snapshot()

    def lend_body(self, nbytes: int, tensor_at: int) -> None:
        """Inline, a body is computed from where it was read: nothing to lend (the engine
        process lends arena room, ``ipc/lending.py``)."""
        return None

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the future resolves exactly once (see ``Batcher``). An inline
        expression's first request waits for its checks (``inline.py``) first."""
        if job.device_in is not None or job.device_out is not None:
            self.device_regions.attach(job)  # 400 when a region is unknown here
        if not self.expressions.is_inline(job.activation):
            return self.batcher.submit(job)
        outer = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._checked_submit(job, outer))
        outer.add_done_callback(lambda f: f.cancelled() and task.cancel())
        return outer

    async def _checked_submit(self, job: Job, outer: asyncio.Future) -> None:
        try:
            try:
                await self.expressions.prepare(job.activation)
                self.capabilities.check(job.activation, job.compute_dtype, job.mode)
            finally:
                self.expressions.settle(job.activation)  # rows of an evicted one go
            inner = self.batcher.submit(job)
        except Exception as exc:  # noqa: BLE001 - handed to the waiter
            if not outer.done():
                outer.set_exception(exc)
            return
        outer.add_done_callback(lambda f: f.cancelled() and self.batcher.abandon(job))
        inner.add_done_callback(lambda f: outer.done() or _chain(f, outer))

    def abandon(self, job: Job) -> None:
        """The client went away: never compute ``job`` if it has not started."""
        self.batcher.abandon(job)


def _chain(src: asyncio.Future, dst: asyncio.Future) -> None:
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())


def _warm_autograd() -> None:
    """torch imports sympy (through ``torch.fx.experimental.symbolic_shapes``) on the first
    ``torch.autograd.grad`` of a process: about 5 s of CPU on a small machine. Imported at
    start-up (off the loop, before readiness), so the first gradient request (the lab page's
    first curves) does not pay for it."""
    try:
        import torch.fx.experimental.symbolic_shapes  # noqa: F401
    except Exception:  # noqa: BLE001 - a warm-up only
        log.debug("warming autograd's imports failed", exc_info=True)
