"""Reading request bodies with the size limit enforced while they stream in.

A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked
body is counted as it arrives and refused the moment it passes the limit. gzip and deflate
bodies (``Content-Encoding``) are inflated with the same limit on the inflated size, so a
small bomb cannot blow up in memory.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.requests import ClientDisconnect, Request

from .errors import InvalidRequest, RequestTimeout, RequestTooLarge, UnsupportedMediaType, echo


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytearray:
    """The whole (inflated) body, or an error: 413 over ``limit``, 408 when the client takes
    longer than ``timeout_s`` to send it."""
    task = asyncio.current_task()
    fired = []

    def too_slow() -> None:
        fired.append(True)
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, too_slow)  # no extra task
    try:
        return await _read_body(request, limit)
    except asyncio.CancelledError:
        if not fired:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()
        raise RequestTimeout(f"the request body was not received within {timeout_s:g} s") from None
    finally:
        timer.cancel()


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest(f"Content-Length {echo(declared)} is not a number") from None
        if size > limit:
            raise RequestTooLarge(
                f"body of {size} bytes is over the server's max_request_bytes={limit}"
            )
    body = bytearray()
    receive = request.receive  # the ASGI channel itself: no stream wrapper per request
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            raise RequestTooLarge(f"body is over the server's max_request_bytes={limit}")
        if not message.get("more_body", False):
            break
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return _inflate(body, zlib.MAX_WBITS | 16, limit, "gzip")
    if encoding == "deflate":
        return _inflate(body, zlib.MAX_WBITS, limit, "deflate")
    raise UnsupportedMediaType(
        f"Content-Encoding {echo(encoding)} is not supported; use gzip, deflate or none"
    )


def _inflate(data: bytearray, wbits: int, limit: int, name: str) -> bytearray:
    inflater = zlib.decompressobj(wbits)
    try:
        out = bytearray(inflater.decompress(data, limit + 1))
        if len(out) > limit or inflater.unconsumed_tail:
            raise RequestTooLarge(f"inflated body is over the server's max_request_bytes={limit}")
        out += inflater.flush()
    except zlib.error as exc:
        if name == "deflate" and wbits == zlib.MAX_WBITS:
            # Some clients send raw deflate without the zlib header.
            return _inflate(data, -zlib.MAX_WBITS, limit, "raw deflate")
        raise InvalidRequest(f"body is not valid {name} data: {exc}") from None
    if not inflater.eof:
        raise InvalidRequest(f"{name} body is truncated")
    return out
