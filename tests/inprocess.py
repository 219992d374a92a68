"""The in-process tier: the app of ``create_app`` driven without a socket.

``InProcess(settings)`` runs the app's lifespan (engine start-up, probe and self-test, the
registrations) on an event loop in a background thread, as uvicorn would, and
``client()`` is a synchronous ``httpx.Client`` whose requests go through
``httpx.ASGITransport`` on that loop: the whole ASGI stack (request context, API keys, the
Host guard, the fast path, the framework's routes and error bodies) runs, only the socket
and uvicorn's HTTP parser do not. An exception the app lets escape becomes a 500, as
uvicorn would answer.

For what only a socket shows (framing, slow clients, header limits, keep-alive, SIGTERM,
several processes, real clients) use ``conftest.serve`` or ``conftest.subprocess_server``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from service.http.app import create_app
from service.settings import Settings

START_TIMEOUT_S = 60


class _LoopTransport(httpx.BaseTransport):
    """A synchronous transport that sends each request through ``httpx.ASGITransport`` on
    the app's event loop (the loop that owns the engine) and waits for the whole answer."""

    def __init__(self, owner: InProcess, timeout_s: float) -> None:
        self._owner = owner
        self._timeout_s = timeout_s
        self._asgi = httpx.ASGITransport(app=owner.app, raise_app_exceptions=False,
                                         client=("127.0.0.1", 40000))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def send() -> tuple[int, httpx.Headers, bytes]:
            inner = httpx.Request(request.method, request.url, headers=request.headers,
                                  content=body, extensions=request.extensions)
            response = await self._asgi.handle_async_request(inner)
            content = b"".join([chunk async for chunk in response.stream])
            return response.status_code, response.headers, content

        future = asyncio.run_coroutine_threadsafe(send(), self._owner.loop)
        status, headers, content = future.result(self._timeout_s)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content),
                              extensions={"http_version": b"HTTP/1.1"})


class InProcess:
    """One app, its lifespan running on a loop thread; ``client()`` talks to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.services = self.app.state.services
        self.engine = self.services.engine
        self.url = f"http://127.0.0.1:{settings.port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="actserve-inprocess")
        self._receive: asyncio.Queue | None = None
        self._lifespan: asyncio.Future | None = None

    async def _start(self) -> None:
        self._receive = asyncio.Queue()
        started: asyncio.Future = self.loop.create_future()
        self._stopped: asyncio.Future = self.loop.create_future()

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                started.set_result(None)
            elif kind == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message", "start-up failed")))
            elif kind.startswith("lifespan.shutdown") and not self._stopped.done():
                self._stopped.set_result(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, self._receive.get, send))
        await self._receive.put({"type": "lifespan.startup"})
        done, _ = await asyncio.wait({started, self._lifespan},
                                     return_when=asyncio.FIRST_COMPLETED)
        if started in done:
            started.result()  # raises if start-up failed
        else:
            self._lifespan.result()
            raise RuntimeError("the app's lifespan ended during start-up")

    async def _stop(self) -> None:
        await self._receive.put({"type": "lifespan.shutdown"})
        await asyncio.wait({self._stopped, self._lifespan}, timeout=30,
                           return_when=asyncio.FIRST_COMPLETED)

    def __enter__(self) -> InProcess:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(START_TIMEOUT_S)
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(40)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    def client(self, timeout: float = 60, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, transport=_LoopTransport(self, timeout),
                            timeout=timeout, **kwargs)


@contextmanager
def in_process(**overrides) -> Iterator[InProcess]:
    """``conftest.serve``'s settings, without a socket: the port is only the one in the
    URLs (the Host header); nothing listens on it."""
    overrides.setdefault("port", 8000)
    overrides.setdefault("access_log", False)
    overrides.setdefault("grpc_port", 0)
    with InProcess(Settings(**overrides)) as app:
        yield app
