"""Large JSON decodes (and large JSON answers) leave the event loop.

A JSON body of a few hundred KiB and up takes milliseconds to seconds to parse and convert;
on the event loop that would hold every other request, ``/healthz`` included. Such bodies
are decoded in a worker thread, where the bounded decoder (``service.codecs.jsonbound``)
parses them in slices of a few milliseconds each, so the loop gets the interpreter back
between slices. Binary bodies (raw tensors, the v2 binary extension) decode in
microseconds and stay on the loop. Decoding is torch-free and only reads shared state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request

OFFLOAD_BYTES = 256 * 1024
BINARY_TYPE = "application/octet-stream"
V2_HEADER = "inference-header-content-length"

T = TypeVar("T")


def is_json_body(request: Request) -> bool:
    """Whether the body is (all) JSON: not raw bytes, not v2 binary framing."""
    headers = request.headers
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype != BINARY_TYPE and V2_HEADER not in headers


async def decode_off_loop(request: Request, decode: Callable[..., T], body: bytearray,
                          *args) -> T:
    """``decode(body, *args)``, in a worker thread for a large JSON body."""
    if len(body) < OFFLOAD_BYTES or not is_json_body(request):
        return decode(body, *args)
    return await asyncio.to_thread(decode, body, *args)


async def encode_off_loop(request: Request, encode: Callable[..., T], job, answer,
                          result) -> T:
    """Large JSON answers are written in a worker thread too (slice by slice)."""
    if result.array.nbytes < OFFLOAD_BYTES or not is_json_body(request):
        return encode(job, answer, result)
    return await asyncio.to_thread(encode, job, answer, result)
