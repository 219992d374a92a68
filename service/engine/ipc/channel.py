"""Control messages between workers and the engine process: one Unix stream socket per
worker, each message a 4-byte little-endian length and an orjson array whose first item
names it. Only plain numbers, strings and lists travel here; tensors stay in the arenas.

Worker -> engine::

    ["hello", pid, arena_name]
    ["job", id, activation, params, wire_dtype, shape, in_offset, out_offset, out_capacity,
     compute_dtype, amp, amp_dtype, inplace, deadline, priority, api, request_id, fault,
     outputs, report, has_grad_output,  # the lab's fields (docs/lab.md)
     expr,  # an inline expression's normalized text (the engine resolves it), else None
     [device_in, device_out]]  # CUDA shared memory: [region, offset, nbytes] or None each;
                               # such a tensor takes no arena bytes (device_refs.py)
    ["cancel", id]
    ["register", request_id, raw]   # a custom activation's raw registration (custom.build)
    ["unregister", request_id, name]
    ["cuda_register", request_id, [name, raw_handle_b64, device_id, byte_size]]
                                    # open a CUDA IPC handle in the device's compute thread
    ["cuda_unregister", request_id, name]

Engine -> worker (every job gets exactly one of done/error/cancelled; every register,
unregister, cuda_register or cuda_unregister exactly one registered)::

    ["state", ready, reason, devices, capability_failures, restarts, waiting, fatal]
                             # fatal: the engine cannot start (a bad --activations-file)
    ["done", id, dtype, shape, compute_s, batch_requests, batch_elements, device, queue_s,
     extra, batch, grad_dtype, reports]  # batch: the BatchReport fields, on the batch's
                                         # first job only; grad_dtype None: no gradient
    ["error", id, error_type, message, batch]
    ["cancelled", id]
    ["registered", request_id, error_type, message, entry]  # error_type None: done; entry:
                                                            # the catalogue entry, or None
    ["activation", raw]  # to every worker: a custom activation the engine now serves (also
                         # each one it has, right after hello and before its state)
    ["removed", name]    # to every worker: one it no longer serves
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import orjson

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


def pack(message: list) -> bytes:
    body = orjson.dumps(message)
    return HEAD.pack(len(body)) + body


class Link(asyncio.Protocol):
    """One end of a connection. Arriving messages are framed as bytes come in and handed,
    in order, to ``on_message`` right there (no coroutine per message); ``on_lost`` once
    it ends; a message over ``MAX_MESSAGE`` ends it. ``send`` queues a message; everything
    queued in one turn of the event loop leaves in one write at the end of that turn, so a
    batch's answers (or a burst of jobs) cost one system call and one wake-up of the peer,
    not one each."""

    def __init__(self, on_message: Callable[[list], None], on_lost: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outbox: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, message: list) -> None:
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
            message = orjson.loads(memoryview(buf)[at + HEAD.size:stop])
            at = stop
            self.on_message(message)
        del buf[:at]

    def connection_lost(self, exc) -> None:
        self.on_lost()


def error_from(error_type: str, message: str) -> ActserveError:
    return ERRORS.get(error_type, ActserveError)(message)
