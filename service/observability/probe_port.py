"""Liveness and readiness on a port of their own (``probe_port``), answered by a thread.

On the API port ``GET /healthz`` and ``GET /readyz`` wait, with every other request, for
the event loop to read them: under overload that is hundreds of milliseconds
(docs/benchmarks.md, "Overload"), and an orchestrator that reads a slow probe as "not live"
restarts a server that is only busy, which moves its load onto the others: the cascade the
overload policy exists to prevent. On the probe port a thread that never waits for the loop
answers from state it reads directly (in one process, this one; with several workers, the
supervisor's, which handles no requests):

* ``/healthz``: 200 ``{"status": "live"}`` while every event loop has ticked within
  ``probe_stall_s``; 503 naming the stalled loop otherwise. A loop under 10× overload still
  ticks every few hundred milliseconds: only one that is wedged (a deadlock, a call that
  never returns) fails it.
* ``/readyz``: 200 ``{"status": "ready", ...}`` as the API's route answers; 503 with the
  reason (warming up, draining, a worker not ready, a loop stalled) and ``Retry-After``.

The port listens from when the API port does (a server warming up answers neither) until
the drain has finished (``/readyz`` meanwhile: 503 ``draining``). Any other path: 404; a
method other than GET or HEAD: 501. HTTP/1.0, one request per connection, read within
``READ_TIMEOUT_S``; one thread answers them one at a time, so the port costs one thread and
a client that sends nothing delays the next probe by at most that long, never the API.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import orjson

from service.errors import ActserveError, NotReady, UnknownActivation, error_body

READ_TIMEOUT_S = 2.0
HEARTBEAT_S = 0.25  # how often the event loop records that it runs

# (status, JSON body, Retry-After or None)
Answer = tuple[int, bytes, "int | None"]


def live() -> Answer:
    return 200, b'{"status":"live"}', None


def refused(exc: ActserveError) -> Answer:
    return exc.status, error_body(False, exc.type, exc.message), exc.retry_after


class Heartbeat:
    """When the event loop last ran a callback: ``run()`` is a task on that loop; ``age()``
    is read from any thread (a float read is atomic under the GIL)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def age(self) -> float:
        return max(0.0, self.clock() - self.last)

    async def run(self, period_s: float = HEARTBEAT_S) -> None:
        while True:
            self.beat()
            await asyncio.sleep(period_s)


class ProbeServer:
    """The probe port: ``answer(path)`` gives ``/healthz`` and ``/readyz`` their answers
    (called on the probe thread; it must not touch the event loop). Bound when made, so a
    port in use fails start-up; ``start()`` runs the thread, ``stop()`` ends it."""

    def __init__(self, host: str, port: int, answer: Callable[[str], Answer]) -> None:
        handler = type("ProbeHandler", (_Handler,), {"answer": staticmethod(answer)})
        self.server = _Listener((host, port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.5},
                                       name="actserve-probes", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class _Listener(socketserver.TCPServer):
    """``http.server.HTTPServer`` without its bind-time ``getfqdn`` (a reverse DNS lookup
    that can take seconds where there is no resolver, a container say), and IPv6 for an
    IPv6 host, as the API port takes it."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no client holds the thread
    timeout = READ_TIMEOUT_S
    server_version = "actserve"
    sys_version = ""
    answer: Callable[[str], Answer]

    def do_GET(self) -> None:
        self._reply(with_body=True)

    def do_HEAD(self) -> None:
        self._reply(with_body=False)

    def _reply(self, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            try:
                status, body, retry = self.answer(path)
            except Exception as exc:  # a probe that cannot be answered is a failed probe
                status, body, retry = refused(ActserveError(f"probe failed: {exc!r}"))
        else:
            status, body, retry = refused(UnknownActivation(
                f"the probe port serves GET /healthz and GET /readyz, not {path[:100]!r}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry is not None:
            self.send_header("Retry-After", str(retry))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """What ``http.server`` refuses (a malformed request line, a method other than GET
        or HEAD, headers too long): the API's JSON error, with a status line even for what
        is not HTTP/1.x at all."""
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        short, _ = self.responses.get(code, ("error", ""))
        body = error_body(False, "invalid_request" if code < 500 else "not_implemented",
                          f"{short}: {message or short}"[:200])
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # probes are not access-logged
        pass


def responder(stalled: Callable[[], str | None], not_ready: Callable[[], ActserveError | None],
              ready: Callable[[], dict]) -> Callable[[str], Answer]:
    """The probes' answers from three questions, the order every server asks them in: a
    stalled event loop (``stalled()``: what is stalled, or None) fails both; else
    ``/healthz`` is live, and ``/readyz`` is ``not_ready()``'s refusal or 200 with
    ``ready()``'s fields beside ``"status": "ready"``."""

    def answer(path: str) -> Answer:
        why = stalled()
        if why is not None:
            return refused(NotReady(f"event loop stalled: {why}"))
        if path == "/healthz":
            return live()
        exc = not_ready()
        if exc is not None:
            return refused(exc)
        return 200, orjson.dumps({"status": "ready", **ready()}), None

    return answer


def slots_not_ready(slots: list[int]) -> NotReady:
    return NotReady(f"not ready: worker slot(s) {slots} not ready")


def answers(engine, heartbeat: Heartbeat | None = None, stall_s: float = 0.0,
            others: Callable[[], list[int]] | None = None) -> Callable[[str], Answer]:
    """What a server process answers to ``/healthz`` and ``/readyz``, wherever it answers
    them (the API's route, the HTTP protocol while congested, the probe port): its engine's
    readiness; with several workers (``others``: the slots not ready, this one included,
    from the shared flags) every worker's; asked from another thread than the loop's, the
    loop's heartbeat too (``heartbeat``; None on the loop itself, which is running)."""

    def stalled() -> str | None:
        age = 0.0 if heartbeat is None else heartbeat.age()
        return f"no tick for {age:.1f} s" if age > stall_s > 0 else None

    def not_ready() -> ActserveError | None:
        if not engine.ready:
            return NotReady(f"not ready: {engine.not_ready_reason()}")
        waiting = others() if others is not None else []
        return slots_not_ready(waiting) if waiting else None

    return responder(stalled, not_ready, lambda: {"devices": engine.devices})
