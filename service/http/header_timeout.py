"""HTTP protocol hardening.

**Header deadline.** A client must finish sending its request headers within
``header_timeout_s`` of connecting (or of starting a request on a kept-alive connection),
else the connection is closed. Uvicorn has a keep-alive timeout but none for headers, so a
slow-loris client could otherwise hold a connection for ever. The body has its own deadline
(``body_timeout_s``, enforced in ``service.body``).

No timer per request: connections waiting for headers are kept in one dict with their
deadlines, and one sweep, every quarter of the timeout (at most 1 s) while any connection
waits, closes the late ones. A late connection is closed within ``header_timeout_s`` plus
one sweep period.

**Header limits.** The request line and headers may take at most ``max_bytes`` bytes and
``max_count`` header lines; more is answered ``431 Request Header Fields Too Large`` and the
connection closed. Bytes are counted as they arrive, before the parser sees them (httptools
would otherwise gather a 64 MiB header value by repeated concatenation first), so a refusal
costs about the time to receive the limit, not the size sent.

**Answers leave user space.** Each connection's write buffer limits are zero: writing pauses
whenever the socket did not take everything, and uvicorn drains before the next message, so
an answer sent from memory lent by the engine is in the kernel before that memory is reused
(``parts_response.py``).

**Overload refusals** are answered here too, while the server is busy or congested, before
the application runs, some from the raw bytes before the parser sees them (``shed.py``);
every request's scope carries its arrival time (``ARRIVAL_KEY``): a new connection's first
request's moved back to when its bytes reached the kernel (``kernel_arrival.py``), and any
request's to the caller's ``X-Request-Start`` stamp when the server trusts it
(``service/exchange/request_start.py``).

**Refusals the HTTP parser makes** (a malformed request line, a bad header) are answered here,
before any application code runs: with an ``X-Request-Id`` and, when the access log is on,
an access-log line with the client's address, like every other answer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.exchange import request_start
from service.http import kernel_arrival
from service.http.drain import DrainingConnection
from service.http.shed import ARRIVAL_KEY, Shed, ShedConnection
from service.observability.logs import AccessLog

HEADER_END = b"\r\n\r\n"
LINGER_S = 1.0  # a refused connection is closed this long after its answer



class _Refused(Exception):
    pass


def close_unless_continued(cycle) -> None:
    """A client that sent ``Expect: 100-continue`` holds its body back until the server's
    ``100 Continue``, which uvicorn sends when the application first reads the body. An
    answer before that (a refusal before the body: overload, 413, 401) leaves the body
    unsent, and on a kept connection the client's next request would be read as that body
    (RFC 9110, 10.1.1: the server says whether it closes or reads on). Such an answer closes
    the connection (uvicorn adds ``Connection: close``); once the 100 went out, nothing
    changes."""
    send = cycle.send

    async def send_closing(message) -> None:
        if cycle.waiting_for_100_continue and not cycle.response_started:
            cycle.keep_alive = False
        await send(message)

    cycle.send = send_closing


def header_timeout_protocol(timeout_s: float, max_bytes: int = 16 * 1024,
                            max_count: int = 100, access: AccessLog | None = None,
                            shed: Shed | None = None,
                            starts: request_start.Starts | None = None,
                            kernel: bool = False) -> type:
    """A protocol class for one server (one event loop); ``shed`` answers overload
    refusals before the application (``shed.py``); ``starts``: a request's arrival is
    moved back to its ``X-Request-Start`` stamp when that is earlier
    (``request_start.py``); ``kernel``: a new connection's first request's, to when its
    bytes reached the kernel (``kernel_arrival.py``)."""
    id_prefix = "h" + uuid.uuid4().hex[:11] + "-"
    ids = itertools.count(1)
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

    class HeaderTimeoutProtocol(ShedConnection, DrainingConnection, HttpToolsProtocol):
        _header_bytes = 0
        _header_count = 0
        _tail = b""
        _refusal: tuple[int, str] | None = None
        _discarding = False
        _message_done = True  # the parser has seen the whole of the last request
        _fresh = kernel  # no byte read yet: the first read dates the first request

        def _arm(self) -> None:
            if self not in waiting:
                waiting[self] = self.loop.time() + timeout_s
                self._header_bytes = self._header_count = 0
                self._tail = b""
                if sweeper[0] is None:
                    sweeper[0] = self.loop.call_later(period, sweep, self.loop)

        def _disarm(self) -> None:
            waiting.pop(self, None)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # pause writing while anything waits in user space, so an answer sent from
            # lent memory is known to have reached the kernel (parts_response.py)
            transport.set_write_buffer_limits(high=0, low=0)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._fresh:  # how long this connection's first bytes waited in the kernel:
                self._fresh = False  # what this read starts is dated from then
                self.kernel_wait = kernel_arrival.waited(
                    self.transport.get_extra_info("socket"))
                try:
                    self.data_received(data)
                finally:
                    self.kernel_wait = 0.0  # later reads are dated by their own
                return
            if self._discarding:
                return
            if self._skip:  # the body of a request refused unparsed (shed.py)
                data = self.skip_body(data)
                if not data:
                    return
            if self.cycle is None or (self.cycle.response_complete and self._message_done):
                if shed is not None and (
                        (shed.unparsed(len(self.tasks)) and self.fast_refusal(data))
                        if data.startswith(b"POST ")  # /healthz, /readyz: not behind the queue
                        else (shed.congested and self.fast_probe(data))):
                    return  # answered unparsed (shed.py)
                # a new request starts on this connection (an answer sent before its
                # request's body was read, a 413 say, leaves that body still arriving:
                # those bytes are the old request's, not the next one's headers)
                self._arm()
            if self in waiting and not self._headers_fit(data):
                self._refuse(431, f"request line and headers over {max_bytes} bytes")
                return
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                status, message = self._refusal or (400, "Invalid HTTP request received.")
                self._refuse(status, message)
                return
            if self._shed_answer is not None:  # refused early, its body still arriving
                self.shed_send(keep_alive=False)

        def _headers_fit(self, data: bytes) -> bool:
            """Count header bytes as they arrive; False once the limit is passed without
            the blank line that ends the headers."""
            before = self._header_bytes
            self._header_bytes += len(data)
            if self._header_bytes > max_bytes:
                room = max_bytes - before
                if (self._tail + data[:max(room, 0)]).find(HEADER_END) < 0:
                    return False
            self._tail = data[-3:]
            return True

        def on_message_begin(self) -> None:
            self._message_done = False
            super().on_message_begin()
            # deadlines count from here (a new connection's first request: from when its
            # bytes reached the kernel)
            self.scope[ARRIVAL_KEY] = time.monotonic() - self.kernel_wait
            self.kernel_wait = 0.0

        def on_message_complete(self) -> None:
            self._message_done = True
            if self._shed_answer is not None:  # refused early: its body is in (shed.py)
                self.shed_send(keep_alive=self.parser.should_keep_alive())
                return
            super().on_message_complete()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > max_count:
                self._refusal = (431, f"more than {max_count} request headers")
                raise _Refused()  # stops the parser at once
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            if starts is not None:  # the deadline counts from the caller's stamp if earlier
                for name, value in self.headers:
                    if name == request_start.HEADER_BYTES:
                        self.scope[ARRIVAL_KEY] = starts.apply(self.scope[ARRIVAL_KEY], value)
                        break
            if shed is not None and self.refused_early():
                return
            super().on_headers_complete()
            cycle = self.cycle  # (none made for an upgrade)
            if cycle is not None and cycle.waiting_for_100_continue:  # Expect: 100-continue
                close_unless_continued(cycle)

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, msg)

        def _refuse(self, status: int, message: str) -> None:
            """Answer a request the server refuses before the application sees it, with a
            request id, and close the connection."""
            self._disarm()
            rid = f"{id_prefix}{next(ids):x}"
            body = message.encode("ascii", "replace")
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.extend([b"content-type: text/plain; charset=utf-8\r\n",
                         b"content-length: " + str(len(body)).encode() + b"\r\n",
                         b"x-request-id: " + rid.encode() + b"\r\n",
                         b"connection: close\r\n\r\n", body])
            self._discarding = True
            transport = self.transport
            if not transport.is_closing():
                transport.write(b"".join(head))
                # Half-close and read (and drop) what the client still sends for a moment
                # before closing: closing with unread bytes would reset the connection, and
                # the client could lose the answer.
                if transport.can_write_eof():
                    transport.write_eof()
                self.loop.call_later(LINGER_S, transport.close)
            if access is not None and access.enabled():
                client = self.client[0] if self.client else None
                access.write({"id": rid, "client": client, "status": status, "error": message})

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderTimeoutProtocol.shed = shed
    HeaderTimeoutProtocol.access = access
    HeaderTimeoutProtocol.linger_s = LINGER_S
    HeaderTimeoutProtocol.request_ids = staticmethod(
        lambda: f"{id_prefix}{next(ids):x}".encode())
    return HeaderTimeoutProtocol
