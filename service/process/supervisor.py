"""The supervisor of a multi-process server (``actserve serve --workers N``, N > 1).

It owns no HTTP and no torch. It cleans what a killed server left in ``/dev/shm``, makes
the instance's run directory and readiness flags, reserves the port, and runs a list of
child specs, each ``(kind, slot, target)``: N ``worker`` children (slots 0..N-1,
``python -m service.process.worker``, its spec on stdin) and, with ``--engine process``,
one ``engine`` child (``python -m service.engine.ipc.host``) that owns the devices and
batches every worker's requests; the workers find it through ``ACTSERVE_ENGINE_SOCKET``.
The engine lives while the supervisor holds its standard input open; it is closed (the
engine drains and exits) only after every worker has drained.

* A child that dies is restarted in the same slot (its readiness flag cleared first and its
  last snapshot retired into the totals), after a back-off that grows while it keeps dying
  young. A worker that fails before the server was ever ready stops the whole server
  (a start-up error, as with one process).
* SIGTERM or SIGINT: every child is sent SIGTERM and drains (no accepted request is lost);
  the supervisor waits for them all, removes the run directory and exits 0 when every
  child did.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from service.engine.factory import engine_mode
from service.engine.ipc.channel import SETTINGS_ENV, SOCKET_ENV
from service.errors import ActserveError, Draining
from service.observability.probe_port import ProbeServer, responder, slots_not_ready
from service.process.rundir import ReadyFlags, RunDir, clean_stale
from service.process.snapshots import SnapshotFiles
from service.process.sockets import reserve_port
from service.settings import Settings

log = logging.getLogger("actserve")
YOUNG_S = 5.0  # a child that dies younger than this doubles its restart delay
MAX_DELAY_S = 10.0
STARTING_GRACE_S = 3.0  # at shutdown, what a worker that is not ready yet gets before SIGKILL


@dataclass(frozen=True)
class ChildSpec:
    kind: str  # "worker" (and, with a shared engine, "engine")
    slot: int
    target: str  # the module run as ``python -m target``, the JSON spec on its stdin


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started: float = 0.0
    generation: int = 0
    delay: float = 0.0
    due: float = 0.0  # when a dead child is started again
    last_exit: int | None = None


ENGINE_TARGET = "service.engine.ipc.host"


def worker_specs(count: int) -> list[ChildSpec]:
    return [ChildSpec("worker", slot, "service.process.worker") for slot in range(count)]


def child_specs(settings: Settings) -> list[ChildSpec]:
    """The workers, and the shared engine when the engine runs in a process of its own."""
    specs = worker_specs(settings.worker_count)
    if engine_mode(settings) == "process":  # decided once, in engine/factory.py
        specs.insert(0, ChildSpec("engine", 0, ENGINE_TARGET))
    return specs


class Supervisor:
    def __init__(self, settings: Settings, specs: list[ChildSpec]) -> None:
        self.settings = settings
        self.specs = specs
        self.run_dir: RunDir | None = None  # the rest is made by run()
        self.flags: ReadyFlags | None = None
        self.files: SnapshotFiles | None = None
        self.port = settings.port
        self.workers = sum(1 for s in specs if s.kind == "worker")
        self.shared_engine = any(s.kind == "engine" for s in specs)
        self.children = [Child(s) for s in specs]
        self.stopping = False
        self.ever_ready = False

    def run(self) -> int:
        for name in clean_stale():
            log.info("actserve: removed %s, left by a server that was killed", name)
        self.run_dir = RunDir.create()
        try:
            self.flags = ReadyFlags(self.run_dir.path / "ready", self.workers, create=True)
            self.files = SnapshotFiles(self.run_dir.snapshots)
            try:
                self.reservation = reserve_port(self.settings.host, self.settings.port)
            except OSError as exc:
                log.error("actserve: cannot listen on %s:%s: %s", self.settings.host,
                          self.settings.port, exc)
                return 1
            self.port = self.reservation.getsockname()[1]
            try:
                probes = self._probe_server()
            except OSError as exc:
                log.error("actserve: cannot listen for probes on %s:%s: %s", self.settings.host,
                          self.settings.probe_port, exc)
                self.reservation.close()
                return 1
            try:
                return self._loop()
            finally:
                if probes is not None:
                    probes.stop()  # before the flags it reads are unmapped
                self.reservation.close()
                self.flags.close()
        finally:
            self.run_dir.remove()
            for name in clean_stale():  # what a child killed at shutdown left behind
                log.info("actserve: removed %s, left by a child that was killed", name)

    # -- the probe port -----------------------------------------------------------------------
    def _probe_server(self) -> ProbeServer | None:
        """``probe_port``: answered on a thread here, from the workers' flags and
        heartbeats, never behind the requests a worker holds (``probe_port.py``)."""
        if not self.settings.probe_port:
            return None
        server = ProbeServer(self.settings.host, self.settings.probe_port, responder(
            self._stalled, self._not_ready, lambda: {"workers": self.workers}))
        server.start()
        log.info("actserve probes on http://%s:%d (/healthz, /readyz)", self.settings.host,
                 server.port)
        return server

    def _stalled(self) -> str | None:
        """Ready workers whose loop has not published its flag for ``probe_stall_s``."""
        stalled = self.flags.stalled(time.monotonic(), self.settings.probe_stall_s)
        if not stalled:
            return None
        return "worker slot " + ", ".join(f"{slot} for {age:.1f} s"
                                          for slot, age in stalled.items())

    def _not_ready(self) -> ActserveError | None:
        if self.stopping:
            return Draining("not ready: draining")
        waiting = self.flags.not_ready()
        return slots_not_ready(waiting) if waiting else None

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_fd = signal.set_wakeup_fd(wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        try:
            log.info("actserve supervisor (pid %d): %d workers on http://%s:%d", os.getpid(),
                     self.workers, self.settings.host, self.port)
            for child in self.children:
                self._start(child)
            failed = False
            while not self.stopping and not failed:
                now = time.monotonic()
                waits = [c.due - now for c in self.children if c.proc is None]
                select.select([wake_r], [], [], max(0.0, min([1.0, *waits])))
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                failed = self._tend()
            return self._drain(failed)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, sig, frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    def _tend(self) -> bool:
        """Reap dead children, start those due; True when the server cannot start."""
        if not self.ever_ready and not self.flags.not_ready():
            self.ever_ready = True
            log.info("actserve: all %d workers ready", self.workers)
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                code = child.last_exit = child.proc.returncode
                child.proc = None
                if child.spec.kind == "worker":
                    self.flags.set(child.spec.slot, False)
                    self.files.retire(child.spec.slot, child.generation)
                if not self.ever_ready and code not in (0, -signal.SIGKILL):
                    log.error("actserve: %s %d exited with %s before the server was ready",
                              child.spec.kind, child.spec.slot, code)
                    return True
                lived = now - child.started
                child.delay = min(MAX_DELAY_S, max(0.1, child.delay * 2)) if lived < YOUNG_S \
                    else 0.0
                child.due = now + child.delay
                log.warning("actserve: %s %d exited with %s after %.1fs; restarting in %.1fs",
                            child.spec.kind, child.spec.slot, code, lived, child.delay)
            if child.proc is None and child.due <= now and not self.stopping:
                self._start(child)
        return False

    def _start(self, child: Child) -> None:
        child.generation += 1
        if child.spec.kind == "engine":
            self._start_engine(child)
            return
        spec = {
            "kind": child.spec.kind, "slot": child.spec.slot, "count": self.workers,
            "run_dir": str(self.run_dir.path), "parent": os.getpid(),
            "generation": child.generation,
            "settings": self._child_settings(),
        }
        # The spec goes through stdin, not argv: settings may hold API keys, and any user
        # can read a process's command line. Its own process group: Ctrl-C in a terminal
        # reaches the supervisor only, which then drains the children.
        env = dict(os.environ)
        if self.shared_engine:
            env[SOCKET_ENV] = str(self.engine_socket)
        child.proc = subprocess.Popen([sys.executable, "-m", child.spec.target],
                                      stdin=subprocess.PIPE, process_group=0, env=env)
        child.proc.stdin.write(json.dumps(spec).encode())
        child.proc.stdin.close()
        child.started = time.monotonic()

    def _child_settings(self) -> dict:
        engine = "process" if self.shared_engine else "inline"
        return self.settings.model_dump(mode="json") | {"port": self.port, "engine": engine,
                                                        "probe_port": 0}  # served here

    @property
    def engine_socket(self):
        return self.run_dir.path / "engine.sock"

    def _start_engine(self, child: Child) -> None:
        """The engine's settings in the environment, its socket as its argument; its
        standard input stays open (held here) for as long as it should live."""
        env = dict(os.environ)
        env[SETTINGS_ENV] = json.dumps(self._child_settings())
        child.proc = subprocess.Popen(
            [sys.executable, "-m", child.spec.target, str(self.engine_socket)],
            stdin=subprocess.PIPE, process_group=0, env=env)
        child.started = time.monotonic()

    def _drain(self, failed: bool) -> int:
        live = [c for c in self.children if c.proc is not None]
        log.info("actserve supervisor: stopping %d children", len(live))
        workers = [c for c in live if c.spec.kind != "engine"]
        engines = [c for c in live if c.spec.kind == "engine"]
        for c in workers:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.graceful_shutdown_s + 15
        ok = not failed
        # A worker still starting has accepted nothing (it listens only once it can serve)
        # and may be waiting out a start-up timeout (an engine that died): it gets a short
        # grace, not the drain's, and is killed after it.
        starting = [c for c in workers if not self.flags.get(c.spec.slot)]
        ok = self._wait(starting, min(deadline, time.monotonic() + STARTING_GRACE_S), ok,
                        killed_ok=True)
        ok = self._wait([c for c in workers if c not in starting], deadline, ok)
        for c in engines:  # the workers have drained: now the engine drains and exits
            c.proc.stdin.close()
        return 0 if self._wait(engines, deadline, ok) else 1

    @staticmethod
    def _wait(live: list[Child], deadline: float, ok: bool, killed_ok: bool = False) -> bool:
        for c in live:
            try:
                code = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                code = c.proc.wait()
                if killed_ok:
                    continue
            # -SIGTERM: the child was still starting (no handler yet, nothing accepted: a
            # worker listens only once it can serve); a serving one drains and exits 0.
            ok = ok and code in (0, -signal.SIGTERM)
        return ok


def supervise(settings: Settings) -> int:
    return Supervisor(settings, child_specs(settings)).run()
