"""``RemoteEngine``: the engine as a server process sees it when one engine process owns
the devices (``--engine process``). It has ``Engine``'s interface, so the HTTP layer does
not know which one it talks to.

Jobs are validated here (the registry and the engine's capability table are local), the
input is copied into a slot of this process's shared-memory arena, a descriptor goes to
the engine, and the answer comes back as a view of another slot, which is freed once the
answer has been sent (``JobResult.release``). The engine sends exactly one final message
per job; slots are freed only then, so the engine never writes into a reused slot.

If the engine process goes away, every job waiting on it is answered 503 at once,
readiness turns false, and the connection is retried until the engine (restarted by
whoever started it) is back and says it is ready.

Custom activations live in the engine process (``host.py``): ``register_custom`` and
``unregister_custom`` forward a registration and await the engine's answer; the engine
announces every change to every worker, and this process keeps its registry (and the
model statistics, through ``on_custom``) in step. On reconnecting to a restarted engine it
sends back every custom activation it knows and stays not ready until each is answered.
Inline expressions are parsed here (a 400 before anything is sent) and travel as text.

CUDA shared-memory regions are opened by the engine process (``open_cuda_region``: a
``cuda_register`` message; a bad handle is the engine's 400); this process keeps each raw
handle and sends them back to a restarted engine like custom activations. A job whose
tensors live in such a region takes no arena bytes for them: its descriptor names the
region (``device_refs.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from service.engine.admission import OVERLOAD_ERRORS, Hint
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from service import dtypes
from service.engine import custom
from service.engine.activations import Activation, Registry
from service.engine.capabilities import Capabilities
from service.engine.device_refs import placeholder
from service.engine.inline import ExpressionCache
from service.engine.ipc import channel, messages
from service.engine.ipc.arena import ALIGN, Arena, ArenaFull, sweep_stale
from service.engine.ipc.lending import Lender, LentBody
from service.engine.ipc.process import EngineProcess
from service.engine.job import BatchReport, Job, JobResult
from service.engine.jobs import JobFactory
from service.errors import (
    ActserveError,
    DeadlineExceeded,
    Draining,
    InvalidRequest,
    NotReady,
    QueueFull,
channel.ERRORS.update(OVERLOAD_ERRORS)  # the engine's overload refusals keep their type
    RequestTooLarge,
    Unavailable,
)
from service.settings import Settings

log = logging.getLogger("actserve.engine")
RECONNECT_S = (0.02, 0.5)  # first and longest pause between connection attempts
_GONE = "the engine process went away while holding this request; retry"


async def _checked_in_the_engine(activation: Activation) -> str | None:
    return None  # never called here: the engine process checks inline expressions


@dataclass(slots=True, eq=False)
class _Pending:
    job: Job
    future: asyncio.Future
    in_off: int
    in_bytes: int
    out_off: int
    out_bytes: int
    sent: bool = False
    lent: tuple[int, int] | None = None  # the input's slot when the body was read into it


class RemoteEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.capabilities = Capabilities()
        self.expressions = ExpressionCache(_checked_in_the_engine)
        self.jobs = JobFactory(settings, self.capabilities, self.expressions.resolve)
        self.devices: list[str] = []
        self.restarts = 0
        self.engine_waiting = 0
        self._ready = False
        self._reason = "connecting to the engine process"
        self._draining = False
        self._stopped = False
        self._observer: Callable[[BatchReport, list], None] | None = None
        self._arena: Arena | None = None
        self._lender: Lender | None = None
        self.bodies_in_place = 0  # jobs whose input went to the engine where it was read
        self._process: EngineProcess | None = None
        self._link: channel.Link | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[int, _Pending] = {}
        self._by_job: dict[Job, int] = {}
        self._backlog: deque[int] = deque()  # waiting for arena space, in order
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._first_state = asyncio.Event()
        self.customs: dict[str, object] = {}  # name -> raw registration, as the engine has it
        self.on_custom: Callable[[str, bool], None] | None = None  # (name, added)
        self._requests: dict[int, asyncio.Future] = {}  # registrations awaiting the engine
        self._resync: set[int] = set()  # re-registrations after a reconnect, unanswered
        self._fatal: str | None = None
        # CUDA region -> its CudaRegister, but for the request id
        self.cuda_handles: dict[str, Callable[[int], messages.CudaRegister]] = {}

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        sweep_stale()
        self._arena = Arena.create(self.settings.shm_arena_mib << 20)
        self._lender = Lender(self._arena, self._room_freed)
        path = os.environ.get(channel.SOCKET_ENV)
        if path is None:
            self._process = EngineProcess(self.settings)
            await self._process.start()
            path = self._process.path
        self._task = asyncio.get_running_loop().create_task(self._connection_loop(path))
        # The engine probes and self-tests its devices before it says it is ready.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready_event(), 300)
        if self._fatal is not None:
            await self.stop()
            raise InvalidRequest(self._fatal)  # start-up stops, naming the problem
        if not self._serving:
            log.error("engine not ready after warm-up: %s", self._reason)

    async def _ready_event(self) -> None:
        while not self._serving and self._fatal is None:
            self._first_state.clear()
            await self._first_state.wait()

    @property
    def _serving(self) -> bool:
        """The engine is ready and has every custom activation this process serves."""
        return self._ready and not self._resync

    async def drain(self) -> None:
        self._draining = True
        while self._pending:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self) -> None:
        self._draining = self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(Unavailable("the server stopped before computing this request"))
        if self._process is not None:
            await self._process.stop()
        if self._arena is not None:
            self._arena.close()

    def begin_drain(self) -> None:
        self._draining = True

    # -- state ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._serving and not self._draining

    def overload(self) -> dict:
        return {}  # the overload policy's state lives in the engine process

    @property
    def draining(self) -> bool:
        return self._draining

    def not_ready_reason(self) -> str:
        if self._draining:
            return "draining"
        if self._ready and self._resync:
            return "registering the custom activations again with the restarted engine"
        return self._reason

    @property
    def waiting(self) -> int:
        """This process's jobs at the engine (queued or computing) and waiting for room."""
        return len(self._pending)

    def fusion_outcomes(self) -> dict[str, int]:
        """Fusion is decided in the engine process; its catalogue entries say what was
        chosen (docs/custom-activations.md). Nothing is counted here."""
        return {}

    def gpu_memory(self) -> list[tuple[str, int, int]]:
        return []  # the engine process owns the devices and their memory

    def observe_batches(self, observer: Callable[[BatchReport, list], None]) -> None:
        """``observer(report, [])`` for every batch whose report the engine attached to one
        of this process's jobs: summed over processes, each batch counts once."""
        self._observer = observer

    # -- custom activations (the engine process holds them) ------------------------------
    async def register_custom(self, raw: object) -> dict:
        """Forward a raw registration (already built here: its 400s are local); the
        engine's catalogue entry once it serves it, and this registry has it too."""
        return await self._ask(partial(messages.Register, raw=raw))

    async def unregister_custom(self, name: str) -> None:
        await self._ask(partial(messages.Unregister, name=name))

    async def _ask(self, message: Callable[[int], object]):
        """Send ``message(request id)`` and await the engine's ``Registered``."""
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._requests[rid] = future
        try:
            if not self._send(message(rid)):
                raise Unavailable("the engine process is restarting; retry")
            try:
                return await asyncio.wait_for(future, channel.REGISTER_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise Unavailable(f"the engine process did not answer within "
                                  f"{channel.REGISTER_TIMEOUT_S:g} s; retry") from None
        finally:
            self._requests.pop(rid, None)

    def _activation(self, raw: object) -> None:
        try:
            act = custom.build(raw)  # no self-test: the engine ran it
        except ActserveError:
            log.exception("the engine announced an activation this process cannot build")
            return
        act.fusion.note = None  # compiled (or not) in the engine process; not shown here
        self.registry.add(act)
        self.customs[act.name] = raw
        if self.on_custom is not None:
            self.on_custom(act.name, True)

    def _removed(self, name: str) -> None:
        self.registry.remove(name)
        self.capabilities.forget(name)
        self.customs.pop(name, None)
        if self.on_custom is not None:
            self.on_custom(name, False)

    def _registered(self, m: messages.Registered) -> None:
        rid, error_type, message, entry = m.request, m.error_type, m.message, m.entry
        if rid in self._resync:
            self._resync.discard(rid)
            if error_type not in (None, "conflict"):  # conflict: another worker was first
                log.error("re-registering with the restarted engine failed: %s", message)
            if not self._resync:
                self._first_state.set()
            return
        future = self._requests.get(rid)
        if future is None or future.done():
            return
        if error_type is None:
            future.set_result(entry)
        else:
            future.set_exception(channel.error_from(error_type, message))

    def _register_again(self) -> None:
        """After a reconnect: the engine may be a new one that has none of them."""
        self._resync = set()
        again = [partial(messages.Register, raw=raw) for raw in self.customs.values()]
        again += self.cuda_handles.values()
        for message in again:
            rid = next(self._ids)
            self._resync.add(rid)
            self._send(message(rid))

    # -- CUDA shared memory (the engine process opens the handles) -------------------------
    async def open_cuda_region(self, name: str, raw: bytes, device_id: int,
                               byte_size: int) -> None:
        message = partial(messages.CudaRegister, name=name, handle=bytes(raw),
                          device_id=device_id, byte_size=byte_size)
        await self._ask(message)
        self.cuda_handles[name] = message

    async def close_cuda_region(self, name: str) -> None:
        if self.cuda_handles.pop(name, None) is not None:
            await self._ask(partial(messages.CudaUnregister, name=name))

    # -- the request path ---------------------------------------------------------------
    async def accuracy(self, name: str) -> dict:
        self.registry.get(name)  # 404 when unknown
        raise InvalidRequest("accuracy tables need --engine inline: ask a server without the "
                             "shared engine process (docs/lab.md); gradients and reports are "
                             "served here")

    def admit(self, hint: Hint | None = None) -> None:
        """The queue and its prediction live in the engine process: an overload refusal
        (``admission.py``) comes back as the job's error; here only the count."""
        if self._draining or self._stopped:
            raise Draining("the server is shutting down; retry on another replica")
        if not self._serving:
            raise NotReady(f"the server is not ready ({self.not_ready_reason()})")
        if len(self._pending) >= self.settings.max_queue_requests:
            raise QueueFull(
                f"the queue is full ({self.settings.max_queue_requests} requests waiting); retry")

    def lend_body(self, nbytes: int, tensor_at: int) -> LentBody | None:
        """Arena room to read a binary body into (``lending.py``); None: read it as usual."""
        if self._lender is None or self._backlog or self._stopped:
            return None
        return self._lender.lend(nbytes, tensor_at)

    def submit(self, job: Job) -> asyncio.Future:
        self.admit()
        out_bytes = 0 if job.device_out is not None else job.numel * _answer_itemsize(job)
        in_bytes = 0 if job.device_in is not None else job.array.nbytes
        if job.grad_output is not None:  # after the input, on a slot boundary
            in_bytes = _aligned(in_bytes) + job.grad_output.nbytes
        if "grad" in job.outputs:  # at the end of the answer's room, on a slot boundary
            out_bytes = _aligned(out_bytes) + job.array.nbytes
        need = in_bytes + out_bytes
        if need > self._arena.size:
            raise RequestTooLarge(
                f"the request needs {need} bytes of shared memory for its input and answer; "
                f"the server has {self._arena.size} (ACTSERVE_SHM_ARENA_MIB)")
        jid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        job.future = future
        p = _Pending(job, future, -1, in_bytes, -1, out_bytes)
        self._pending[jid] = p
        self._by_job[job] = jid
        lent = self._lender.holding(job.array) if self._lender is not None else None
        if lent is not None:
            if not self._backlog and self._adopt(p, lent):
                self._send_job(jid, p)
                return future
            _copy_out(job)  # the usual path: the lent slot never waits for room
            lent.release()
        if self._backlog or not self._place(jid, p):
            self._backlog.append(jid)
        return future

    def abandon(self, job: Job) -> None:
        jid = self._by_job.get(job)
        if jid is None:
            return
        p = self._pending[jid]
        if p.future.done():
            return  # answered: whoever holds the answer releases its slots
        p.future.cancel()
        if p.sent:
            self._send(messages.Cancel(jid))  # the slots are freed when the engine answers
        else:
            self._forget(jid)  # never left this process

    # -- internals ---------------------------------------------------------------------
    def _adopt(self, p: _Pending, lent: LentBody) -> bool:
        """Use the lent slot the job's input already lies in; False when the layout is not
        the engine's (input on a slot boundary, the upstream gradient on the next) or the
        answer has no room now."""
        job = p.job
        at = self._lender.offset(job.array)
        if at % ALIGN or not job.array.flags.c_contiguous:
            return False
        if job.grad_output is not None and (
                not job.grad_output.flags.c_contiguous
                or self._lender.offset(job.grad_output) != at + _aligned(job.array.nbytes)):
            return False
        try:
            p.out_off = self._arena.alloc(p.out_bytes)
        except ArenaFull:
            return False
        self._lender.adopt(lent)
        self.bodies_in_place += 1
        p.in_off = at
        p.lent = (lent.slot, lent.slot_bytes)
        return True

    def _place(self, jid: int, p: _Pending) -> bool:
        """Copy the input into a slot and send the job; False when the arena is full."""
        arena = self._arena
        try:
            p.in_off = arena.alloc(p.in_bytes)
        except ArenaFull:
            return False
        try:
            p.out_off = arena.alloc(p.out_bytes)
        except ArenaFull:
            arena.free(p.in_off, p.in_bytes)
            p.in_off = -1
            return False
        job = p.job
        if job.device_in is None:  # else the input stays in the client's CUDA region
            arena.view(p.in_off, job.array.nbytes)[:] = job.array.reshape(-1).view("u1")
        if job.grad_output is not None:
            at = p.in_off + _aligned(job.array.nbytes)
            arena.view(at, job.grad_output.nbytes)[:] = job.grad_output.reshape(-1).view("u1")
        self._send_job(jid, p)
        return True

    def _send_job(self, jid: int, p: _Pending) -> None:
        job = p.job
        m = job.mode
        p.sent = self._send(messages.Job(
            jid, job.activation.name, job.params, job.wire_dtype, job.array.shape, p.in_off,
            p.out_off, p.out_bytes, m.compute_dtype, m.amp, m.amp_dtype, m.inplace,
            job.deadline, job.priority, job.api, job.request_id, job.fault, job.outputs,
            job.report, job.grad_output is not None,
            job.activation.formula if self.expressions.is_inline(job.activation) else None,
            None if job.device_in is None else job.device_in.wire(),
            None if job.device_out is None else job.device_out.wire()))
        if not p.sent:
            self._resolve(jid, error=Unavailable(_GONE))

    def _room_freed(self) -> None:
        if self._backlog:
            self._drain_backlog()

    def _drain_backlog(self) -> None:
        now = time.monotonic()
        while self._backlog:
            jid = self._backlog[0]
            p = self._pending.get(jid)
            if p is None or p.future.done():
                self._backlog.popleft()
                if p is not None:
                    self._forget(jid)
                continue
            if p.job.deadline <= now:
                self._backlog.popleft()
                self._resolve(jid, error=DeadlineExceeded(
                    "the request's deadline passed while it waited for shared memory; it was "
                    "not computed"))
                continue
            if not self._place(jid, p):
                return
            self._backlog.popleft()

    def _send(self, message: object) -> bool:
        if self._link is None or not self._link.open:
            return False
        self._link.send(message)
        return True

    def _forget(self, jid: int) -> None:
        """Drop a job and give its slots back (the engine is done with them)."""
        p = self._pending.pop(jid, None)
        if p is None:
            return
        self._by_job.pop(p.job, None)
        if p.lent is not None:
            self._arena.free(*p.lent)
        elif p.in_off >= 0:
            self._arena.free(p.in_off, p.in_bytes)
        if p.out_off >= 0:
            self._arena.free(p.out_off, p.out_bytes)
        if not self._pending:
            self._idle.set()
        if self._backlog:
            self._drain_backlog()

    def _resolve(self, jid: int, result: JobResult | None = None,
                 error: Exception | None = None) -> None:
        p = self._pending.get(jid)
        if p is None:
            return
        if result is not None and not p.future.done():
            # the slots stay lent until the answer has been sent
            result.release = lambda: self._forget(jid)
            p.future.set_result(result)
            return
        if error is not None and not p.future.done():
            p.future.set_exception(error)
        self._forget(jid)

    def _fail_all(self, error: Exception) -> None:
        self._backlog.clear()
        for jid in list(self._pending):
            self._resolve(jid, error=error)

    # -- the connection ----------------------------------------------------------------
    async def _connection_loop(self, path: str) -> None:
        pause = RECONNECT_S[0]
        while not self._stopped:
            loop = asyncio.get_running_loop()
            lost = loop.create_future()
            link = channel.Link(self._on_message, partial(_settle, lost), messages.for_worker)
            try:
                await loop.create_unix_connection(lambda ln=link: ln, path)
            except OSError:
                await asyncio.sleep(pause)  # the engine is (re)starting
                pause = min(pause * 2, RECONNECT_S[1])
                continue
            pause = RECONNECT_S[0]
            self._link = link
            link.send(messages.Hello(messages.PROTOCOL, os.getpid(), self._arena.name))
            self._register_again()
            try:
                await lost  # messages arrive in Link.data_received meanwhile
            finally:
                self._link = None
                link.close()
            if self._stopped:
                return
            self._ready = False
            self._reason = "the engine process is restarting"
            log.error("lost the engine process; failing %d waiting requests", len(self._pending))
            self._fail_all(Unavailable(_GONE))
            self._resync = set()
            for future in self._requests.values():
                if not future.done():
                    future.set_exception(Unavailable(_GONE))
            self._first_state.set()

    def _on_message(self, m: object) -> None:
        handle = self._handlers.get(type(m))
        if handle is not None:
            handle(self, m)
        else:
            self._unreadable(m)

    def _done(self, m: messages.Done) -> None:
        p = self._pending.get(m.id)
        if p is None:
            return
        storage, shape = dtypes.STORAGE[m.dtype], m.shape
        if p.job.device_out is not None:  # written into the client's CUDA region
            array = placeholder(storage, shape)
        else:
            array = self._arena.array(p.out_off, storage, shape)
        self._report(m.batch)
        result = JobResult(array, m.dtype, m.compute_s, m.batch_requests, m.batch_elements,
                           m.device, m.queue_s, m.extra, reports=_reports_in(m.reports))
        if m.grad_dtype is not None:
            nbytes = p.job.array.nbytes
            result.grad = self._arena.array(p.out_off + p.out_bytes - nbytes,
                                            dtypes.STORAGE[m.grad_dtype], shape)
            result.grad_dtype = m.grad_dtype
        self._resolve(m.id, result)

    def _error(self, m: messages.Error) -> None:
        self._report(m.batch)
        self._resolve(m.id, error=channel.error_from(m.error_type, m.message))

    def _cancelled(self, m: messages.Cancelled) -> None:
        self._forget(m.id)

    def _state(self, m: messages.State) -> None:
        if m.fatal:
            self._fatal = m.reason
        self.capabilities.record(dict(m.capability_failures))
        self.devices = m.devices
        self.restarts = m.restarts + (self._process.restarts if self._process else 0)
        self.engine_waiting = m.waiting
        self._ready = bool(m.ready)
        self._reason = m.reason or "ready"
        self._first_state.set()

    def _unreadable(self, m: object) -> None:
        """A message this process cannot read: the engine speaks another protocol."""
        error = m.error if isinstance(m, messages.Unreadable) else type(m).__name__
        self._ready = False
        self._reason = (f"the engine process sent a message this worker cannot read ({error}); "
                        f"it speaks engine channel protocol {messages.PROTOCOL}")
        log.error("%s", self._reason)
        if self._link is not None:
            self._link.close()

    _handlers: ClassVar[dict] = {  # how each message from the engine is handled
        messages.Done: _done, messages.Error: _error, messages.Cancelled: _cancelled,
        messages.State: _state,
        messages.Activation: lambda self, m: self._activation(m.raw),
        messages.Removed: lambda self, m: self._removed(m.name),
        messages.Registered: _registered,
    }

    def _report(self, batch: messages.Batch | None) -> None:
        if batch is not None and self._observer is not None:
            self._observer(BatchReport(batch.activation, batch.requests, batch.elements,
                                       batch.device, batch.wall_s, batch.compute_s,
                                       batch.h2d_s, batch.d2h_s), [])


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _copy_out(job: Job) -> None:
    """Move a job's tensors out of a lent slot (it is given back)."""
    job.array = job.array.copy()
    if job.grad_output is not None:
        job.grad_output = job.grad_output.copy()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _reports_in(reports: dict) -> dict:
    """A profile's trace travels as text on the channel; the HTTP layer keeps bytes."""
    trace = reports.get("profile", {}).get("trace")
    if isinstance(trace, str):
        reports["profile"]["trace"] = trace.encode()
    return reports


def _answer_itemsize(job: Job) -> int:
    """Bytes per element the answer may need: its dtype is the compute dtype, or with
    autocast whatever the op returns (the autocast dtype or float32)."""
    size = dtypes.itemsize(job.compute_dtype)
    return max(size, 4) if job.mode.amp else size
