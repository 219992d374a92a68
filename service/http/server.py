"""Running the app under uvicorn: one place for the server's HTTP settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from service.http import drain
from service.observability import probe_port
from service.settings import Settings

log = logging.getLogger("actserve")


def uvicorn_config(app: FastAPI, settings: Settings, **overrides) -> uvicorn.Config:
    http: object = "auto"
    try:
        from service.http.header_timeout import header_timeout_protocol

        services = getattr(app.state, "services", None)
        http = header_timeout_protocol(settings.header_timeout_s, settings.max_header_bytes,
                                       settings.max_header_count,
                                       getattr(app.state, "access_log", None),
                                       services.shed if services is not None else None,
                                       services.starts if services is not None else None,
                                       settings.kernel_arrival)
    except ImportError:  # httptools absent (uvicorn without [standard]): no header timeout
        pass
    options = dict(
        host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_keep_alive=settings.timeout_keep_alive_s,
        backlog=settings.backlog,
        timeout_graceful_shutdown=settings.graceful_shutdown_s, loop="auto", http=http,
        lifespan="on", server_header=False, h11_max_incomplete_event_size=settings.max_header_bytes,
        **proxy_options(settings),
        log_config=None,  # uvicorn's lines go to the root logger: one format (service.observability.logs)
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


def start_probes(services) -> Callable[[], None]:
    """The probe port (``probe_port``, one process: with several workers the supervisor
    serves it) and the loop's heartbeat it reads; returns what stops both. Started once the
    API port listens, as that port is (a server warming up answers neither)."""
    settings = services.settings
    if not settings.probe_port:
        return lambda: None
    heartbeat = probe_port.Heartbeat()
    server = probe_port.ProbeServer(settings.host, settings.probe_port, probe_port.answers(
        services.engine, heartbeat, settings.probe_stall_s))
    server.start()
    beating = asyncio.ensure_future(heartbeat.run())
    log.info("actserve probes on http://%s:%d (/healthz, /readyz)", settings.host, server.port)

    def stop() -> None:
        beating.cancel()
        server.stop()

    return stop


def proxy_options(settings: Settings) -> dict:
    """X-Forwarded-For / -Proto are believed only from the configured proxies; with none
    configured they are ignored (uvicorn would otherwise trust them from 127.0.0.1)."""
    allowed = [p.strip() for p in settings.forwarded_allow_ips.split(",") if p.strip()]
    if not allowed:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(allowed)}


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new work at once (503, not ready), stop accepting (the
    connections already queued in the kernel are taken and answered, later connects are
    refused: ``service/http/drain.py``), finish every accepted request, then exit 0 (a
    requested stop that drained cleanly is a success; uvicorn would otherwise re-raise the
    signal after shutdown)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stopped_accepting = False
    _stop_probes = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:  # listening: what the probe port's "ready" promises
            self._stop_probes = start_probes(self.config.app.state.services)

    def _protocol(self, _loop=None):
        """A connection's protocol, as uvicorn's own server makes it."""
        return self.config.http_protocol_class(
            config=self.config, server_state=self.server_state,
            app_state=self.lifespan.state, _loop=_loop)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)  # drained; the probe port said "draining" meanwhile
        if self._stop_probes is not None:
            self._stop_probes()

    def handle_exit(self, sig, frame):
        self.config.app.state.services.engine.begin_drain()
        if self._loop is not None and getattr(self, "servers", None):
            self._loop.call_soon_threadsafe(self._stop_accepting)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def _stop_accepting(self) -> None:
        if self._stopped_accepting:
            return
        self._stopped_accepting = True
        drain.stop_accepting(self.servers, self._loop, self._protocol)
