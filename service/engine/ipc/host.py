"""The engine process: ``python -m service.engine.ipc.host SOCKET``.

It owns the devices (one ``Engine``: executors, batcher, self-test) and serves workers on
a Unix socket. Each worker says hello with its shared-memory arena; its jobs arrive as
descriptors naming slots in that arena, are batched with every other worker's jobs, and
the compute thread writes each answer straight into the slot the worker reserved. The
engine sends exactly one final message per job (done, error or cancelled), after which
it never touches that job's slots again, so the worker may reuse them.

It is also the source of truth for custom activations (docs/custom-activations.md): it
loads ``--activations-file`` at its start, registers what workers forward (``register``,
``unregister``; probe and self-test in its compute threads), and announces every change
to every connected worker (``activation``, ``removed``), and everything it serves to a
worker that says hello. Inline expressions arrive as text on the job and are resolved by
its own ``ExpressionCache``, so the same expression from any worker batches here.

CUDA shared-memory regions (``cuda_register``, ``cuda_unregister``) are opened in the
compute thread of their device and kept per worker (``Worker.tag``): a job names its
region and the engine attaches the opened one; a worker that goes away has its regions
closed (after any job still using them).

Settings come from the parent as JSON in ``ACTSERVE_ENGINE_SETTINGS``. The parent holds
the engine's standard input: when it closes it (or dies), the engine drains (accepted
jobs finish) and exits 0. SIGINT and SIGTERM are ignored: a Ctrl-C or a signal sent to
the whole process group must not stop the engine under workers that are still draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from functools import partial
from typing import ClassVar

import tomllib

from service import dtypes
from service.engine import custom
from service.engine.device_refs import placeholder, ref_from_wire
from service.engine.engine import Engine
from service.engine.ipc import channel, messages, pinning
from service.engine.ipc.arena import ALIGN, Arena, pid_alive, sweep_stale, unlink
from service.engine.job import BatchReport, Job, JobResult, Mode
from service.engine.reports import to_channel
from service.errors import ActserveError, InvalidRequest
from service.settings import Settings

OVERLOAD_STATE_S = 1.0  # the overload state goes to the workers at most this often

log = logging.getLogger("actserve.engine")
_TAGS = itertools.count(1)


class Worker:
    """One connected worker: its connection, its arena, its jobs in the engine."""

    def __init__(self, gone: asyncio.Future) -> None:
        self.link: channel.Link | None = None  # set once connected
        self.gone = gone  # done when its connection has ended
        self.pid = 0
        self.arena: Arena | None = None
        self.jobs: dict[int, Job] = {}
        self.tag = f"w{next(_TAGS)}/"  # its CUDA regions' keys in the engine
        self.pinning: asyncio.Task | None = None  # registering its arena with CUDA

    @property
    def closed(self) -> bool:
        return self.gone.done()

    def send(self, message: object) -> None:
        if not self.closed:
            self.link.send(message)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


class EngineHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.workers: set[Worker] = set()
        self.reports: dict[Job, BatchReport] = {}
        self.engine.observe_batches(self._batch_done)
        self.engine.pool.on_readiness_change = lambda _ready: self._broadcast_state()
        self.customs: dict[str, object] = {}  # name -> raw registration, in order
        self.loaded = asyncio.Event()  # the activations file is in (or there is none)
        self.fatal: str | None = None  # why the engine cannot serve (a bad file)
        self.tasks: set[asyncio.Task] = set()
        self._overload_seen = (0.0, None)  # (when its state was last sent, what it was)

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> messages.State:
        e = self.engine
        failures = list(e.capabilities.failures().items())
        ready = e.ready and self.loaded.is_set() and self.fatal is None
        if self.fatal is not None:
            reason = self.fatal
        elif not self.loaded.is_set() and e.ready:
            reason = "loading the activations file"
        else:
            reason = "" if ready else e.not_ready_reason()
        return messages.State(ready, reason, self.fatal is not None, e.devices, failures,
                              e.restarts, e.waiting, e.overload())

    def _broadcast(self, message: object) -> None:
        for w in self.workers:
            w.send(message)

    def _broadcast_state(self) -> None:
        self._broadcast(self._state())

    # -- custom activations ---------------------------------------------------------------
    async def load_file(self) -> None:
        """``--activations-file``: registered before the engine says it is ready; a bad
        entry makes the engine's state fatal (the servers stop starting, naming it)."""
        path = self.settings.activations_file
        try:
            for raw, where in custom.file_entries(path) if path else []:
                await self._register(custom.build(raw, where), raw)
        except (ActserveError, OSError, tomllib.TOMLDecodeError) as exc:
            message = exc.message if isinstance(exc, ActserveError) else str(exc)
            self.fatal = message if path in message else f"{path}: {message}"
            log.error("engine: %s", self.fatal)
        finally:
            self.loaded.set()

    async def _register(self, activation, raw: object) -> None:
        await self.engine.register(activation)  # probe + self-test; 400 or 409
        self.customs[activation.name] = raw
        self._broadcast(messages.Activation(raw))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answered(self, worker: Worker, rid: int, what: str, work) -> None:
        """Await ``work`` (a catalogue entry, or None) and answer the worker's request with
        exactly one ``registered``, whatever happens: never a hang."""
        try:
            entry = await work
        except ActserveError as exc:
            worker.send(messages.Registered(rid, exc.type, exc.message))
        except Exception as exc:  # noqa: BLE001 - answered
            log.exception("engine: %s failed", what)
            worker.send(messages.Registered(rid, "internal_error",
                                            f"{type(exc).__name__}: {exc}"))
        else:
            worker.send(messages.Registered(rid, None, None, entry))

    async def _register_raw(self, raw: object) -> dict:
        """A worker's POST: every worker hears ``activation`` before the asker hears
        ``registered`` (one stream, in order), so its registry has it when it answers."""
        await self.loaded.wait()
        activation = custom.build(raw)
        await self._register(activation, raw)
        return activation.describe()

    def _unregister_for(self, worker: Worker, rid: int, name: str) -> None:
        try:
            self.engine.unregister(name)  # 404 unknown, 400 built in
        except ActserveError as exc:
            worker.send(messages.Registered(rid, exc.type, exc.message))
            return
        self.customs.pop(name, None)
        self._broadcast(messages.Removed(name))
        worker.send(messages.Registered(rid))

    # -- CUDA shared memory ------------------------------------------------------------------
    async def _open_cuda(self, worker: Worker, m: messages.CudaRegister) -> None:
        await self.engine.device_regions.open(worker.tag + m.name, m.handle, m.device_id,
                                              m.byte_size)
        if worker.closed:  # went away meanwhile: nobody will unregister it
            await self.engine.device_regions.close_prefix(worker.tag)

    async def _cuda_unregister_for(self, worker: Worker, rid: int, name: str) -> None:
        await self.engine.device_regions.close(worker.tag + name)
        worker.send(messages.Registered(rid))

    # -- a worker's connection ------------------------------------------------------------
    def connect(self) -> channel.Link:
        """A worker connects: its messages are handled as they arrive (``_on_message``)."""
        worker = Worker(asyncio.get_running_loop().create_future())
        worker.link = channel.Link(partial(self._on_message, worker),
                                   partial(self._worker_gone, worker), messages.for_engine)
        self.workers.add(worker)
        return worker.link

    def _on_message(self, worker: Worker, message: object) -> None:
        try:
            handle = self._handlers.get(type(message), EngineHost._unreadable)
            handle(self, worker, message)
        except Exception:
            log.exception("engine: bad control message; dropping the worker's connection")
            worker.close()

    def _hello(self, worker: Worker, m: messages.Hello) -> None:
        if m.protocol != messages.PROTOCOL:
            self._refuse(worker, m.protocol)
            return
        worker.pid = m.pid
        worker.arena = Arena.attach(m.arena)
        if self._cuda:
            worker.pinning = asyncio.ensure_future(asyncio.to_thread(pinning.pin, worker.arena))
        for raw in self.customs.values():  # what it serves, before its state
            worker.send(messages.Activation(raw))
        worker.send(self._state())

    def _refuse(self, worker: Worker, protocol: object) -> None:
        """A worker of another protocol: told why (a fatal state), then disconnected."""
        log.error("engine: a worker (protocol %s) was refused: this engine speaks %s",
                  protocol, messages.PROTOCOL)
        worker.send(messages.refusal(protocol))
        worker.close()

    def _unreadable(self, worker: Worker, m: messages.Unreadable) -> None:
        protocol = messages.hello_protocol(m)
        if protocol is not None and protocol != messages.PROTOCOL:
            self._refuse(worker, protocol)
            return
        raise ValueError(f"unreadable message: {m.error}")

    def _register_msg(self, worker: Worker, m: messages.Register) -> None:
        self._spawn(self._answered(worker, m.request, "registering", self._register_raw(m.raw)))

    def _unregister_msg(self, worker: Worker, m: messages.Unregister) -> None:
        self._unregister_for(worker, m.request, m.name)

    def _cuda_register_msg(self, worker: Worker, m: messages.CudaRegister) -> None:
        self._spawn(self._answered(worker, m.request, "opening a CUDA IPC handle",
                                   self._open_cuda(worker, m)))

    def _cuda_unregister_msg(self, worker: Worker, m: messages.CudaUnregister) -> None:
        self._spawn(self._cuda_unregister_for(worker, m.request, m.name))

    def _cancel_msg(self, worker: Worker, m: messages.Cancel) -> None:
        self._cancel(worker, m.id)

    def _worker_gone(self, worker: Worker) -> None:
        """Its connection ended (it went away, or is stopping)."""
        if worker.closed:
            return
        worker.gone.set_result(None)
        self.workers.discard(worker)
        for job in list(worker.jobs.values()):
            if job.t_dispatch == 0:  # never started: nobody will want it
                self.engine.abandon(job)
        self._spawn(self.engine.device_regions.close_prefix(worker.tag))
        self._maybe_release(worker)

    def _maybe_release(self, worker: Worker) -> None:
        """Unmap a departed worker's arena once no job of it is computing."""
        if worker.closed and not worker.jobs and worker.arena is not None:
            arena, worker.arena = worker.arena, None
            if worker.pinning is None:
                self._close_arena(worker, arena)
            else:
                self._spawn(self._unpin_and_close(worker, arena))

    async def _unpin_and_close(self, worker: Worker, arena: Arena) -> None:
        """CUDA forgets the registration before the mapping goes."""
        try:
            if await worker.pinning:
                await asyncio.to_thread(pinning.unpin, arena)
        finally:
            self._close_arena(worker, arena)

    @staticmethod
    def _close_arena(worker: Worker, arena: Arena) -> None:
        arena.close()
        if not pid_alive(worker.pid):  # a killed worker cannot unlink its own
            unlink(arena.name)

    @property
    def _cuda(self) -> bool:
        return any(d.startswith("cuda") for d in self.engine.devices)

    # -- jobs ---------------------------------------------------------------------------
    def _job(self, worker: Worker, m: messages.Job) -> None:
        jid = m.id
        try:
            if worker.arena is None:
                raise InvalidRequest("job before hello")
            storage = dtypes.STORAGE[m.wire_dtype]
            shape = m.shape
            array = worker.arena.array(m.in_offset, storage, shape) if m.device_in is None \
                else placeholder(storage, shape)  # the input is in a CUDA region
            # an unknown name (a custom one this engine does not have) is a clear 404
            activation = self.engine.expressions.resolve(m.expr) if m.expr is not None \
                else self.engine.registry.get(m.activation)
            job = Job(activation, m.params, array, m.wire_dtype,
                      Mode(m.compute_dtype, m.amp, m.amp_dtype, m.inplace), m.deadline,
                      m.priority, m.api, m.request_id, fault=m.fault,
                      out=None if m.device_out is not None
                      else worker.arena.view(m.out_offset, m.out_capacity),
                      outputs=m.outputs, report=m.report,
                      device_in=ref_from_wire(m.device_in, worker.tag),
                      device_out=ref_from_wire(m.device_out, worker.tag))
            if m.upstream:  # the upstream gradient follows the input on a slot boundary
                at = m.in_offset + -(-array.nbytes // ALIGN) * ALIGN
                job.grad_output = worker.arena.array(at, storage, shape)
            future = self.engine.submit(job)
        except ActserveError as exc:
            worker.send(messages.Error(jid, exc.type, exc.message))
            return
        except (KeyError, ValueError, TypeError) as exc:
            worker.send(messages.Error(jid, "internal_error", f"bad job descriptor: {exc}"))
            return
        worker.jobs[jid] = job
        future.add_done_callback(lambda f: self._finish(worker, jid, job, f))

    def _cancel(self, worker: Worker, jid: int) -> None:
        job = worker.jobs.get(jid)
        # A job already handed to the compute thread runs to the end (it writes into the
        # worker's slot); the worker hears "done" and frees the slots then.
        if job is not None and job.t_dispatch == 0:
            self.engine.abandon(job)

    def _finish(self, worker: Worker, jid: int, job: Job, future: asyncio.Future) -> None:
        worker.jobs.pop(jid, None)
        report = self.reports.pop(job, None)
        batch = None
        if report is not None:
            batch = messages.Batch(report.activation, report.requests, report.elements,
                                   report.device, report.wall_s, report.compute_s,
                                   report.h2d_s, report.d2h_s)
        if future.cancelled():
            worker.send(messages.Cancelled(jid))
        elif future.exception() is not None:
            exc = future.exception()
            err = exc if isinstance(exc, ActserveError) else ActserveError(str(exc))
            worker.send(messages.Error(jid, err.type, err.message, batch,
                                       self.engine.predicted_wait()))
        else:
            r: JobResult = future.result()
            worker.send(messages.Done(jid, r.dtype, r.array.shape, r.compute_s,
                                      r.batch_requests, r.batch_elements, r.device, r.queue_s,
                                      r.extra, batch, r.grad_dtype, to_channel(r.reports),
                                      self.engine.predicted_wait()))
        self._maybe_release(worker)
        self._overload_state()

    def _overload_state(self) -> None:
        """The overload policy's state to every worker (their /metrics), at most once a
        second and only when it changed (a switch, more waits measured)."""
        now = time.monotonic()
        sent, last = self._overload_seen
        if now - sent < OVERLOAD_STATE_S:
            return
        a = self.engine.batcher.admission
        key = (a.overloaded, a.switches, a.error_n)
        if key != last:
            self._broadcast_state()
        self._overload_seen = (now, key)

    def _batch_done(self, report: BatchReport, jobs: list[Job]) -> None:
        """Runs before the batch's futures' callbacks: the report rides on the first job
        of the batch that will be answered, so summing over workers counts it once."""
        for job in jobs:
            if job.future is not None and not job.future.cancelled():
                self.reports[job] = report
                return

    _handlers: ClassVar[dict] = {  # how each message from a worker is handled
        messages.Job: _job, messages.Cancel: _cancel_msg, messages.Hello: _hello,
        messages.Register: _register_msg, messages.Unregister: _unregister_msg,
        messages.CudaRegister: _cuda_register_msg, messages.CudaUnregister: _cuda_unregister_msg,
    }


async def serve(socket_path: str, settings: Settings) -> int:
    sweep_stale()
    host = EngineHost(settings)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = await asyncio.get_running_loop().create_unix_server(host.connect, path=socket_path)
    os.chmod(socket_path, 0o600)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent_gone = await _until_stdin_closes()
    await host.engine.start()
    await host.load_file()
    host._broadcast_state()
    log.info("engine ready=%s on %s; %d custom activations", host.engine.ready,
             host.engine.devices, len(host.customs))
    await parent_gone
    host.engine.begin_drain()
    host._broadcast_state()
    await host.engine.drain()
    server.close()
    workers = list(host.workers)
    for w in workers:
        w.close()
    await asyncio.gather(*(w.gone for w in workers), return_exceptions=True)
    await host.engine.stop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    return 0


async def _until_stdin_closes() -> asyncio.Future:
    """A future that completes when standard input reaches its end (the parent closed it,
    or died)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc) -> None:
            if not done.done():
                done.set_result(None)

    await loop.connect_read_pipe(Watch, sys.stdin)
    return done


def main(argv: list[str]) -> int:
    settings = Settings.model_validate_json(os.environ[channel.SETTINGS_ENV])
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    try:  # the event loop the HTTP workers run too (uvicorn's "auto"): cheaper per message
        from uvloop import new_event_loop
    except ImportError:
        new_event_loop = None
    if new_event_loop is None or not hasattr(asyncio, "Runner"):  # Python 3.10: asyncio's
        return asyncio.run(serve(argv[0], settings))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(argv[0], settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
