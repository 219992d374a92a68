"""HTTP protocol hardening: a client must finish sending its request headers within
``header_timeout_s`` of connecting (or of starting a request on a kept-alive connection),
else the connection is closed. Uvicorn has a keep-alive timeout but none for headers, so a
slow-loris client could otherwise hold a connection for ever. The body has its own deadline
(``body_timeout_s``, enforced in ``service.body``).

No timer per request: connections waiting for headers are kept in one dict with their
deadlines, and one sweep, every quarter of the timeout (at most 1 s) while any connection
waits, closes the late ones. A late connection is closed within ``header_timeout_s`` plus
one sweep period.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.drain import DrainingConnection


def header_timeout_protocol(timeout_s: float) -> type:
    """A protocol class for one server (one event loop)."""
    period = min(1.0, max(0.01, timeout_s / 4))
    waiting: dict[HttpToolsProtocol, float] = {}  # connection -> deadline (loop clock)
    sweeper: list[asyncio.TimerHandle | None] = [None]

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        sweeper[0] = None
        now = loop.time()
        late = [conn for conn, deadline in waiting.items() if deadline <= now]
        for conn in late:
            del waiting[conn]
            if not conn.transport.is_closing():
                conn.transport.close()
        if waiting:
            sweeper[0] = loop.call_later(period, sweep, loop)

    class HeaderTimeoutProtocol(DrainingConnection, HttpToolsProtocol):
        def _arm(self) -> None:
            if self not in waiting:
                waiting[self] = self.loop.time() + timeout_s
                if sweeper[0] is None:
                    sweeper[0] = self.loop.call_later(period, sweep, self.loop)

        def _disarm(self) -> None:
            waiting.pop(self, None)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # a new request starts on this connection
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
