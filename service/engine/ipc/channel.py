"""The framing of the channel between workers and the engine process: one Unix stream
socket per worker, each message a 4-byte little-endian length and a MessagePack body. The
messages themselves, typed, and the protocol version are in ``messages.py``; only plain
numbers, strings, bytes, lists and maps travel here; tensors stay in the arenas.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import msgspec

from service.errors import STATUS_TABLE, ActserveError, Unavailable

HEAD = struct.Struct("<I")
SOCKET_ENV = "ACTSERVE_ENGINE_SOCKET"  # set by a supervisor that runs the engine process
SETTINGS_ENV = "ACTSERVE_ENGINE_SETTINGS"  # the engine process's settings, as JSON
MAX_MESSAGE = 8 << 20  # a profile's trace rides on its "done"
MAX_TRACE = MAX_MESSAGE - (64 << 10)  # the rest of that message fits in 64 KiB
# a registration's probe and self-test in every compute thread, and, when it asks for fusion,
# its compile (fusion.COMPILE_LIMIT_S): it is served only once that is decided
REGISTER_TIMEOUT_S = 360.0

ERRORS: dict[str, type[ActserveError]] = {cls.type: cls for cls in STATUS_TABLE}
ERRORS[Unavailable.type] = Unavailable
ERRORS[ActserveError.type] = ActserveError


_encode = msgspec.msgpack.Encoder().encode
_decode_plain = msgspec.msgpack.Decoder().decode


def pack(message: object) -> bytes:
    """One framed message: a ``messages`` struct (or any plain value)."""
    body = _encode(message)
    return HEAD.pack(len(body)) + body


class Link(asyncio.Protocol):
    """One end of a connection. Arriving messages are framed as bytes come in and handed,
    in order, to ``on_message`` right there (no coroutine per message); ``on_lost`` once
    it ends; a message over ``MAX_MESSAGE`` ends it. ``decode`` reads one message's body
    (``messages.for_engine`` / ``for_worker``; plain values by default). ``send`` queues a
    message (a ``messages`` struct); everything
    queued in one turn of the event loop leaves in one write at the end of that turn, so a
    batch's answers (or a burst of jobs) cost one system call and one wake-up of the peer,
    not one each."""

    def __init__(self, on_message: Callable[[object], None], on_lost: Callable[[], None],
                 decode: Callable[[memoryview], object] = _decode_plain) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.decode = decode
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outbox: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, message: object) -> None:
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(pack(message))

    def _flush(self) -> None:
        parts, self._outbox = self._outbox, []
        if self.open:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        at, end = 0, len(buf)
        while end - at >= HEAD.size:
            (size,) = HEAD.unpack_from(buf, at)
            if size > MAX_MESSAGE:
                self.transport.close()
                return
            stop = at + HEAD.size + size
            if stop > end:
                break
            message = self.decode(memoryview(buf)[at + HEAD.size:stop])
            at = stop
            self.on_message(message)
        del buf[:at]

    def connection_lost(self, exc) -> None:
        self.on_lost()


def error_from(error_type: str, message: str) -> ActserveError:
    return ERRORS.get(error_type, ActserveError)(message)
