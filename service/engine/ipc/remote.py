"""``RemoteEngine``: the engine as a server process sees it when one engine process owns
the devices (``--engine process``). It has ``Engine``'s interface, so the HTTP layer does
not know which one it talks to.

Jobs are validated here (the registry and the engine's capability table are local), the
input is copied into a slot of this process's shared-memory arena (``slots.py``), a
``messages.Job`` goes to the engine, and the answer comes back as a view of another slot,
which is freed once the answer has been sent (``JobResult.release``). The engine sends
exactly one final message per job; a job stays in the pending table (``pending.py``) and its
slots stay reserved until then, so the engine never writes into a reused slot.

If the engine process goes away, every job waiting on it is answered 503 at once,
readiness turns false, and the connection is retried until the engine (restarted by
whoever started it) is back and says it is ready.

Custom activations and CUDA shared-memory regions live in the engine process; this process
forwards their registrations and follows the engine's announcements (``forwarding.py``),
and sends them all back to a restarted engine, staying not ready until each is answered.
Inline expressions are parsed here (a 400 before anything is sent) and travel as text. A
job whose tensors live in a CUDA region takes no arena bytes for them: its descriptor names
the region (``device_refs.py``).
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
from functools import partial
from typing import ClassVar

from service import dtypes
from service.engine.activations import Activation, Registry
from service.engine.admission import OVERLOAD_ERRORS, Hint, RemoteWait
from service.engine.capabilities import Capabilities
from service.engine.device_refs import placeholder
from service.engine.inline import ExpressionCache
from service.engine.ipc import channel, messages
from service.engine.ipc.arena import Arena, sweep_stale
from service.engine.ipc.forwarding import Forwarding
from service.engine.ipc.lending import Lender, LentBody
from service.engine.ipc.pending import Pending, PendingJobs
from service.engine.ipc.process import EngineProcess
from service.engine.ipc.slots import Slots, copy_out, room
from service.engine.job import BatchReport, Job, JobResult
from service.engine.jobs import JobFactory
from service.engine.reports import from_channel
from service.errors import (
    DeadlineExceeded,
    Draining,
    InvalidRequest,
    NotReady,
    QueueFull,
    Unavailable,
)
from service.settings import Settings

log = logging.getLogger("actserve.engine")
channel.ERRORS.update(OVERLOAD_ERRORS)  # the engine's overload refusals keep their type
RECONNECT_S = (0.02, 0.5)  # first and longest pause between connection attempts
_GONE = "the engine process went away while holding this request; retry"


async def _checked_in_the_engine(activation: Activation) -> str | None:
    return None  # never called here: the engine process checks inline expressions


class RemoteEngine:
    """The engine as a worker sees it when the engine process owns the devices
    (``protocol.EngineProtocol``)."""

    mode = "process"

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
        self._slots: Slots | None = None
        self.bodies_in_place = 0  # jobs whose input went to the engine where it was read
        self._process: EngineProcess | None = None
        self._link: channel.Link | None = None
        self._task: asyncio.Task | None = None
        self._pending = PendingJobs()
        self._engine_wait = RemoteWait(settings, time.monotonic)  # the engine's queue, seen
        self._overload: dict = {}  # the engine's overload state (``State.overload``)
        self.shows_overload = True  # False in every worker but the first
        self._backlog: deque[int] = deque()  # waiting for arena space, in order
        self._ids = itertools.count(1)
        self._first_state = asyncio.Event()
        self._fatal: str | None = None
        self._forwarding = Forwarding(self.registry, self.capabilities, self._send, self._ids,
                                      self._first_state.set)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        sweep_stale()
        self._arena = Arena.create(self.settings.shm_arena_mib << 20)
        self._lender = Lender(self._arena, self._room_freed)
        self._slots = Slots(self._arena, self._lender)
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
        return self._ready and not self._forwarding.resyncing

    async def drain(self) -> None:
        self._draining = True
        await self._pending.empty()

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

    @property
    def draining(self) -> bool:
        return self._draining

    def not_ready_reason(self) -> str:
        if self._draining:
            return "draining"
        if self._ready and self._forwarding.resyncing:
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

    def overload(self) -> dict:
        """The engine process's overload state as its last ``State`` carried it (at most
        a second old), shown by one worker only (``shows_overload``): the workers' numbers
        are summed into one server's, and the engine's would count once per worker."""
        return self._overload if self.shows_overload else {}

    def observe_batches(self, observer: Callable[[BatchReport, list], None]) -> None:
        """``observer(report, [])`` for every batch whose report the engine attached to one
        of this process's jobs: summed over processes, each batch counts once."""
        self._observer = observer

    # -- custom activations and CUDA regions (the engine process holds them) -------------
    @property
    def customs(self) -> dict[str, object]:
        """Name -> raw registration, as the engine has it."""
        return self._forwarding.customs

    @property
    def cuda_handles(self) -> dict:
        return self._forwarding.cuda_handles

    @property
    def on_custom(self) -> Callable[[str, bool], None] | None:
        return self._forwarding.on_custom

    @on_custom.setter
    def on_custom(self, callback: Callable[[str, bool], None] | None) -> None:
        """``callback(name, added)`` whenever the engine adds or removes one."""
        self._forwarding.on_custom = callback

    async def register_custom(self, raw: object, activation: Activation | None = None) -> dict:
        """Forward a raw registration (``activation``, built here already, had its 400s
        locally); the engine's catalogue entry once it serves it, and this registry has it
        too (``on_custom`` hears of it when the engine announces it)."""
        return await self._forwarding.register(raw)

    async def unregister_custom(self, name: str) -> None:
        await self._forwarding.unregister(name)

    async def load_file(self, path: str) -> list[str]:
        """``--activations-file``: the engine process loads it itself and announces its
        entries, so there is nothing to do here."""
        return []

    async def open_cuda_region(self, name: str, raw: bytes, device_id: int,
                               byte_size: int) -> None:
        await self._forwarding.open_cuda_region(name, raw, device_id, byte_size)

    async def close_cuda_region(self, name: str) -> None:
        await self._forwarding.close_cuda_region(name)

    # -- the request path ---------------------------------------------------------------
    async def accuracy(self, name: str) -> dict:
        self.registry.get(name)  # 404 when unknown
        raise InvalidRequest("accuracy tables need --engine inline: ask a server without the "
                             "shared engine process (docs/lab.md); gradients and reports are "
                             "served here")

    def busy(self) -> bool:
        """This process's share of the queue is full, or the engine's predicted wait
        (drained since it was seen) stands above the target delay."""
        return (len(self._pending) >= self.settings.max_queue_requests
                or self._engine_wait.busy())

    def admit(self, hint: Hint | None = None) -> None:
        """The queue and its prediction live in the engine process: an overload refusal
        (``admission.py``) comes back as the job's error. Here the count, and, with a
        ``hint``, the engine's predicted wait as its last answer gave it
        (``admission.RemoteWait``): a request that cannot finish by its deadline is refused
        before its body is read."""
        if self._draining or self._stopped:
            raise Draining("the server is shutting down; retry on another replica")
        if not self._serving:
            raise NotReady(f"the server is not ready ({self.not_ready_reason()})")
        if len(self._pending) >= self.settings.max_queue_requests:
            raise QueueFull(
                f"the queue is full ({self.settings.max_queue_requests} requests waiting); retry")
        self._engine_wait.check(hint)

    def lend_body(self, nbytes: int, tensor_at: int) -> LentBody | None:
        """Arena room to read a binary body into (``lending.py``); None: read it as usual."""
        if self._lender is None or self._backlog or self._stopped:
            return None
        return self._lender.lend(nbytes, tensor_at)

    def submit(self, job: Job) -> asyncio.Future:
        self.admit()
        future = asyncio.get_running_loop().create_future()
        p = Pending(job, future, *room(job))
        self._slots.check(p)  # 413 when the whole arena could not hold it
        jid = next(self._ids)
        job.future = future
        self._pending.add(jid, p)
        lent = self._lender.holding(job.array) if self._lender is not None else None
        if lent is not None:
            if not self._backlog and self._slots.adopt(p, lent):
                self.bodies_in_place += 1
                self._send_job(jid, p)
                return future
            copy_out(job)  # the usual path: the lent slot never waits for room
            lent.release()
        if self._backlog or not self._place(jid, p):
            self._backlog.append(jid)
        return future

    def abandon(self, job: Job) -> None:
        jid = self._pending.id_of(job)
        if jid is None:
            return
        p = self._pending.get(jid)
        if p.future.done():
            return  # answered: whoever holds the answer releases its slots
        p.future.cancel()
        if p.sent:
            self._send(messages.Cancel(jid))  # the slots are freed when the engine answers
        else:
            self._forget(jid)  # never left this process

    # -- internals ---------------------------------------------------------------------
    def _place(self, jid: int, p: Pending) -> bool:
        """Copy the input into a slot and send the job; False when the arena is full."""
        if not self._slots.place(p):
            return False
        self._send_job(jid, p)
        return True

    def _send_job(self, jid: int, p: Pending) -> None:
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
        p = self._pending.pop(jid)
        if p is None:
            return
        self._slots.free(p)
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
        for jid in self._pending.ids():
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
            self._forwarding.register_again()
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
            self._forwarding.lost(Unavailable(_GONE))
            self._first_state.set()

    def _on_message(self, m: object) -> None:
        handle = self._handlers.get(type(m))
        if handle is not None:
            handle(self, m)
        else:
            self._unreadable(m)

    def _done(self, m: messages.Done) -> None:
        self._engine_wait.observe(m.wait_s)
        p = self._pending.get(m.id)
        if p is None:
            return
        if p.job.device_out is not None:  # written into the client's CUDA region
            array = placeholder(dtypes.STORAGE[m.dtype], m.shape)
        else:
            array = self._slots.answer(p, m.dtype, m.shape)
        self._report(m.batch)
        result = JobResult(array, m.dtype, m.compute_s, m.batch_requests, m.batch_elements,
                           m.device, m.queue_s, m.extra, reports=from_channel(m.reports))
        if m.grad_dtype is not None:
            result.grad = self._slots.gradient(p, m.grad_dtype, m.shape)
            result.grad_dtype = m.grad_dtype
        self._resolve(m.id, result)

    def _error(self, m: messages.Error) -> None:
        self._report(m.batch)
        self._engine_wait.observe(m.wait_s)
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
        self._overload = m.overload
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
        messages.Activation: lambda self, m: self._forwarding.added(m),
        messages.Removed: lambda self, m: self._forwarding.removed(m),
        messages.Registered: lambda self, m: self._forwarding.registered(m),
    }

    def _report(self, batch: messages.Batch | None) -> None:
        if batch is not None and self._observer is not None:
            self._observer(BatchReport(batch.activation, batch.requests, batch.elements,
                                       batch.device, batch.wall_s, batch.compute_s,
                                       batch.h2d_s, batch.d2h_s), [])


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
