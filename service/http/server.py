"""Running the app under uvicorn: one place for the server's HTTP settings."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from service.settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings, **overrides) -> uvicorn.Config:
    http: object = "auto"
    try:
        from service.http.header_timeout import header_timeout_protocol

        http = header_timeout_protocol(settings.header_timeout_s)
    except ImportError:  # httptools absent (uvicorn without [standard]): no header timeout
        pass
    options = dict(
        host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s, loop="auto", http=http,
        lifespan="on",
        log_config=None,  # uvicorn's lines go to the root logger: one format (service.observability.logs)
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new work at once (503, not ready), let uvicorn close the
    listener and finish every accepted request, then exit 0 (a requested stop that drained
    cleanly is a success; uvicorn would otherwise re-raise the signal after shutdown)."""

    def handle_exit(self, sig, frame):
        self.config.app.state.runtime.batcher.begin_drain()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
