"""Reading request bodies with the size limit enforced while they stream in.

A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked
body is counted as it arrives and refused the moment it passes the limit. gzip and deflate
bodies (``Content-Encoding``) are inflated as they arrive, a bounded step at a time, with
the same limit on the inflated size and every inflated byte charged to the body budget, so a
small bomb can neither blow up in memory nor hold the event loop.
"""

from __future__ import annotations

import asyncio
import zlib

import numpy as np
from starlette.requests import ClientDisconnect, Request

from service.codecs.jsonbound import VALUE_SLACK
from service.errors import (
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
    echo,
)
from service.exchange.budget import BodyBudget
from service.http.offload import is_json_body


def declared_size(request: Request, limit: int) -> int | None:
    """The body's Content-Length (None when chunked), checked: 400 when it is not a
    number, 413 over ``limit``: refused before a byte is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequest(f"Content-Length {echo(declared)} is not a number") from None
    if size > limit:
        raise RequestTooLarge(f"body of {size} bytes is over the server's max_request_bytes={limit}")
    return max(size, 0)


async def read_body(request: Request, size: int | None, limit: int,
                    timeout_s: float = 30.0, budget: BodyBudget | None = None,
                    granted: int = 0, min_rate: int = 0,
                    max_values: int | None = None,
                    into: np.ndarray | None = None) -> tuple[bytearray | np.ndarray, int]:
    """The whole (inflated) body of ``declared_size`` ``size`` and the bytes it now holds
    of ``budget`` (``granted`` plus what inflating charged), or an error: 413 over
    ``limit``, 408 when the client takes longer than ``timeout_s`` to send it, or, holding
    a share of the budget, sends slower than ``min_rate`` bytes/s on average after a
    one-second grace. A JSON body inflating to more than ``max_values`` values (plus the
    request's other fields) is refused as soon as it does (413). ``into``: bytes of exactly
    ``size`` to read a plain (not encoded) body into, returned as the body; an encoded body
    is read as usual."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    progress = _Progress(loop.time())

    def stop(why: str) -> None:
        fired.append(why)
        task.cancel()

    timer = loop.call_later(timeout_s, stop, f"was not received within {timeout_s:g} s")
    rate_timer = None
    if granted and min_rate:
        def check_rate() -> None:
            nonlocal rate_timer
            elapsed = loop.time() - progress.start
            if progress.received < min_rate * (elapsed - RATE_GRACE_S):
                stop(f"arrived slower than {min_rate} bytes/s; it lost its share of the "
                     "server's body budget")
                return
            due = progress.received / min_rate + RATE_GRACE_S  # when the average drops
            rate_timer = loop.call_later(max(due - elapsed, 0.05), check_rate)

        rate_timer = loop.call_later(RATE_GRACE_S, check_rate)
    charge = _Charge(budget)
    try:
        body = await _read_body(request, size, limit, progress, charge, max_values, into)
        return body, granted + charge.held
    except asyncio.CancelledError:
        charge.release()
        if not fired:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()
        raise RequestTimeout(f"the request body {fired[0]}") from None
    except BaseException:
        charge.release()
        raise
    finally:
        charge.done()
        timer.cancel()
        if rate_timer is not None:
            rate_timer.cancel()


RATE_GRACE_S = 1.0
INFLATE_STEP = 1 << 20  # bytes inflated per step; the loop runs other work between steps


class _Progress:
    __slots__ = ("received", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.received = 0


class _Charge:
    """Inflated bytes charged to the body budget as they are produced (``BodyBudget.charge``:
    waits while they do not fit, except for the oldest inflating request)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget | None) -> None:
        self.budget = budget
        self.held = 0

    async def add(self, n: int) -> None:
        if self.budget is not None and n:
            await self.budget.charge(n, self)
            self.held += n

    def done(self) -> None:
        if self.budget is not None:
            self.budget.done_inflating(self)

    def release(self) -> None:
        if self.budget is not None and self.held:
            self.budget.release(self.held)
            self.held = 0


async def _read_body(request: Request, size: int | None, limit: int, progress: _Progress,
                     charge: _Charge, max_values: int | None,
                     into: np.ndarray | None) -> bytearray | np.ndarray:
    receive = request.receive  # the ASGI channel itself: no stream wrapper per request
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {echo(encoding)} is not supported; use gzip, deflate or none"
        )
    json_values = max_values if max_values is not None and is_json_body(request) else None
    inflater = None if encoding in ("", "identity") else \
        _Inflater(encoding, limit, charge, json_values)
    if size is None:
        body = await _read_chunked(receive, limit, progress, inflater)
    else:
        if inflater is not None or into is None or into.nbytes != size:
            into = None  # an encoded body is inflated into memory of its own
        body = await _read_sized(receive, size, progress, inflater, into)
    if inflater is None:
        return body
    return inflater.finish()


async def _read_sized(receive, size: int, progress: _Progress, inflater,
                      into: np.ndarray | None) -> bytearray | np.ndarray:
    """A body of a declared size. The HTTP parser frames the body by its Content-Length,
    so more or fewer bytes mean a broken client."""
    body = await _read_chunked(receive, size, progress, inflater, declared=True, into=into)
    if progress.received != size:
        raise InvalidRequest(
            f"the body has {progress.received} bytes but Content-Length says {size}")
    return body


async def _read_chunked(receive, limit: int, progress: _Progress, inflater,
                        declared: bool = False,
                        into: np.ndarray | None = None) -> bytearray | np.ndarray:
    """The body's pieces, counted against ``limit`` as they arrive, then joined with one
    copy. (Appending to a bytearray grows it by about an eighth at a time, so a 4 MiB body
    arriving in 64 KiB pieces was copied about eight times over; a zero-filled buffer of
    the declared size costs a full extra pass over fresh pages.) With ``into`` (a plain body
    of a declared size), each piece is copied where it belongs there as it arrives, and
    ``into`` is the body: no joining copy. An encoded body is inflated as it arrives, a
    bounded step at a time."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        at = progress.received
        progress.received += len(chunk)
        if progress.received > limit:
            if declared:
                raise InvalidRequest(f"the body is longer than its Content-Length ({limit})")
            raise RequestTooLarge(f"body is over the server's max_request_bytes={limit}")
        if into is not None:
            if chunk:
                into[at:progress.received] = np.frombuffer(chunk, np.uint8)
        elif inflater is None:
            chunks.append(chunk)
        elif chunk:
            while True:
                piece, more = inflater.feed(chunk)
                await inflater.charge.add(len(piece))
                if not more:
                    break
                chunk = b""
                await asyncio.sleep(0)  # a step done: let the loop answer others
        if not message.get("more_body", False):
            return into if into is not None else bytearray().join(chunks)


class _Inflater:
    """gzip / deflate inflation with the size limit on the inflated bytes, each step at most
    ``INFLATE_STEP`` bytes, each step charged to the body budget. Anything after the end of
    the compressed stream (trailing bytes, a second gzip member) is refused."""

    def __init__(self, encoding: str, limit: int, charge: _Charge,
                 max_values: int | None) -> None:
        self.max_values = max_values  # a JSON body: values counted as they inflate
        self.commas = 0
        self.name = encoding
        self.limit = limit
        self.charge = charge
        self.out: list[bytes] = []
        self.size = 0
        self.z = None if encoding == "deflate" else zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Inflate one step of ``data`` (and of what is left over): the bytes it gave, and
        whether more is pending (call again with b"")."""
        if self.z is None:  # deflate: with the zlib header, or raw as some clients send
            zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and \
                (data[0] << 8 | data[1]) % 31 == 0
            self.z = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        z = self.z
        if z.eof:
            if data:
                raise InvalidRequest(f"the {self.name} body has bytes after its end")
            return b"", False
        try:
            piece = z.decompress(z.unconsumed_tail + data if data else z.unconsumed_tail,
                                 INFLATE_STEP)
        except zlib.error as exc:
            raise InvalidRequest(f"body is not valid {self.name} data: {exc}") from None
        self.size += len(piece)
        if self.size > self.limit:
            raise RequestTooLarge(
                f"inflated body is over the server's max_request_bytes={self.limit}")
        if self.max_values is not None:
            self.commas += piece.count(b",")
            if self.commas > self.max_values + VALUE_SLACK:
                raise RequestTooLarge(
                    f"the inflated body holds more than {self.max_values + VALUE_SLACK} JSON "
                    f"values, over the server's max_batch_elements={self.max_values}")
        self.out.append(piece)
        if z.eof and z.unused_data:
            raise InvalidRequest(f"the {self.name} body has bytes after its end (trailing data "
                                 "or a second member)")
        return piece, bool(z.unconsumed_tail)

    def finish(self) -> bytearray:
        if self.z is None or not self.z.eof:
            raise InvalidRequest(f"{self.name} body is truncated")
        return bytearray().join(self.out)
