"""One activation request's path through the server, shared by the native and v2 routes:
time each phase with locals, run the job, build the timing headers, record metrics and the
access-log fields, and count refusals. Routes supply only decoding and encoding.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.engine.job import Job, JobResult
from service.engine.runtime import Runtime
from service.errors import ActserveError
from service.http.body import declared_size, read_body
from service.http.offload import decode_off_loop, encode_off_loop

Decoder = Callable[[bytearray], Job]
Encoder = Callable[[Job, JobResult], Response]


CLIENT_CLOSED = 499  # the client went away before its answer (nginx's convention)


def server_timing(decode: float, queue: float, compute: float, encode: float,
                  total: float) -> str:
    """Milliseconds to the microsecond: parts rounded down and the total up, so the parts
    never add up to more than the total on the wire either."""
    parts = [(name, math.floor(value * 1e6)) for name, value in
             (("decode", decode), ("queue", queue), ("compute", compute), ("encode", encode))]
    parts.append(("total", math.ceil(total * 1e6)))
    return ", ".join(f"{name};dur={us / 1000:.3f}" for name, us in parts)


async def handle(request: Request, api: str, activation: str | None,
                 decode: Decoder, encode: Encoder) -> Response:
    rt: Runtime = request.app.state.runtime
    ctx = request.scope.get("actserve", {})
    t0 = time.perf_counter()
    rt.request_started()
    job = result = None
    bytes_in = bytes_out = 0
    status = 500
    t_decoded = t_computed = t0
    granted = 0
    try:
        rt.batcher.admit()  # overload is refused before the body is read
        limit = rt.settings.max_request_bytes
        size = declared_size(request, limit)  # refused here if it cannot be read at all
        # unknown (chunked) size: claim the limit
        granted = await rt.bodies.acquire(limit if size is None else size,
                                          rt.settings.body_timeout_s)
        body, granted = await read_body(request, size, limit, rt.settings.body_timeout_s,
                                        rt.bodies, granted, rt.settings.min_body_rate_bytes_s,
                                        rt.settings.max_batch_elements)
        bytes_in = len(body)
        job = await decode_off_loop(request, decode, body)
        job.request_id = ctx.get("request_id", "")
        if rt.settings.fault_injection:
            job.fault = request.headers.get("x-actserve-fault")
        t_decoded = time.perf_counter()
        result = await rt.run(job, request.receive)
        t_computed = time.perf_counter()
        response = await encode_off_loop(request, encode, job, result)
        t_end = time.perf_counter()
        bytes_out = getattr(response, "nbytes", None) or len(response.body)
        total = t_end - t0
        response.headers["Server-Timing"] = server_timing(
            t_decoded - t0, result.queue_s, result.compute_s, t_end - t_computed, total)
        response.headers["X-Batch-Size"] = str(result.batch_requests)
        response.headers["X-Batch-Elements"] = str(result.batch_elements)
        status = response.status_code
        ctx["log"] = {
            "api": api, "activation": activation, "shape": list(job.array.shape),
            "dtype": job.wire_dtype, "compute_dtype": job.compute_dtype, "out_dtype": result.dtype,
            "amp": job.mode.amp, "inplace": job.mode.inplace, "batch": result.batch_requests,
            "decode_ms": round((t_decoded - t0) * 1000, 3),
            "queue_ms": round(result.queue_s * 1000, 3),
            "compute_ms": round(result.compute_s * 1000, 3),
            "encode_ms": round((t_end - t_computed) * 1000, 3),
        }
        return response
    except ActserveError as exc:
        status = exc.status
        rt.reject(exc)
        ctx["log"] = {"api": api, "activation": activation, "error": exc.type}
        # error responses carry the total too (the middleware adds the header)
        ctx["server_timing"] = f"total;dur={math.ceil((time.perf_counter() - t0) * 1e6) / 1000:.3f}"
        raise
    except ClientDisconnect:
        # Nobody is listening: answer nothing useful, but end the request cleanly.
        status = CLIENT_CLOSED
        ctx["log"] = {"api": api, "activation": activation, "error": "client_closed"}
        return Response(status_code=CLIENT_CLOSED)
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        rt.bodies.release(granted)
        now = time.perf_counter()
        rt.record(api, activation, status, total=now - t0, decode=t_decoded - t0,
                  encode=now - t_computed if result is not None else 0.0, job=job,
                  result=result, bytes_in=bytes_in, bytes_out=bytes_out)
