"""One activation request's path through the server, in one direction, shared by the
native and v2 routes (a route only picks the codec):

    admit -> read the body (within the body budget) -> codec.decode -> engine.submit
    -> wait (watching for a disconnect) -> codec.encode -> send; recorder.record once

Each phase is timed with locals; ``Server-Timing`` and the batch headers go on the answer,
the access-log fields into the request context, and every refusal is counted once.
"""

from __future__ import annotations

import asyncio
import math
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.codecs.base import Codec, Encoded, Wire
from service.engine.engine import Engine
from service.engine.job import Job, JobResult
from service.errors import ActserveError
from service.http.body import declared_size, read_body
from service.http.offload import decode_off_loop, encode_off_loop
from service.http.parts_response import PartsResponse
from service.http.services import Services

CLIENT_CLOSED = 499  # the client went away before its answer (nginx's convention)
LEND_BYTES = 64 << 10  # binary bodies this large are read straight into engine memory
WATCH_AFTER_S = 0.5  # a job waiting longer than this gets a disconnect watcher


def server_timing(decode: float, queue: float, compute: float, encode: float,
                  total: float) -> str:
    """Milliseconds to the microsecond: parts rounded down and the total up, so the parts
    never add up to more than the total on the wire either."""
    parts = [(name, math.floor(value * 1e6)) for name, value in
             (("decode", decode), ("queue", queue), ("compute", compute), ("encode", encode))]
    parts.append(("total", math.ceil(total * 1e6)))
    return ", ".join(f"{name};dur={us / 1000:.3f}" for name, us in parts)


def to_response(answer: Encoded, release=None) -> Response:
    """The answer as a response; ``release`` (memory lent for the answer) runs after the
    last byte is sent."""
    if isinstance(answer.body, list) or release is not None:
        parts = answer.body if isinstance(answer.body, list) else [answer.body]
        return PartsResponse(parts, media_type=answer.media_type, headers=answer.headers,
                             release=release)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)


async def handle(request: Request, codec: Codec, name: str, wire: Wire) -> Response:
    svc: Services = request.app.state.services
    engine, recorder, settings = svc.engine, svc.recorder, svc.settings
    ctx = request.scope.get("actserve", {})
    api = codec.api
    activation = engine.registry.find(name)
    label = activation.name if activation is not None else None
    t0 = time.perf_counter()
    recorder.request_started()
    job = result = None
    bytes_in = bytes_out = 0
    status = 500
    t_decoded = t_computed = t0
    granted = 0
    lent = None
    try:
        engine.admit()  # overload is refused before the body is read
        limit = settings.max_request_bytes
        size = declared_size(request, limit)  # refused here if it cannot be read at all
        # unknown (chunked) size: claim the limit
        granted = await svc.bodies.acquire(limit if size is None else size,
                                           settings.body_timeout_s)
        lent = _lend(engine, codec, wire, request, size)
        body, granted = await read_body(request, size, limit, settings.body_timeout_s,
                                        svc.bodies, granted, settings.min_body_rate_bytes_s,
                                        settings.max_batch_elements,
                                        lent.view if lent is not None else None)
        bytes_in = len(body)
        if activation is None:
            activation = engine.registry.get(name)  # raises UnknownActivation
        job, answer = await decode_off_loop(request, codec.decode, body, wire, activation,
                                            engine.jobs)
        job.request_id = ctx.get("request_id", "")
        if settings.fault_injection:
            job.fault = request.headers.get("x-actserve-fault")
        t_decoded = time.perf_counter()
        result = await _wait(engine, job, request.receive)
        t_computed = time.perf_counter()
        if "profile" in result.reports and svc.traces is not None:
            await asyncio.to_thread(svc.traces.keep, result.reports)
        encoded = await encode_off_loop(request, codec.encode, job, answer, result)
        response = to_response(encoded, result.release)
        result.release = None  # the response owns it now
        t_end = time.perf_counter()
        bytes_out = encoded.nbytes
        total = t_end - t0
        response.headers["Server-Timing"] = server_timing(
            t_decoded - t0, result.queue_s, result.compute_s, t_end - t_computed, total)
        response.headers["X-Batch-Size"] = str(result.batch_requests)
        response.headers["X-Batch-Elements"] = str(result.batch_elements)
        status = response.status_code
        ctx["log"] = {
            "api": api, "activation": label, "shape": list(job.array.shape),
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
        recorder.reject(exc)
        ctx["log"] = {"api": api, "activation": label, "error": exc.type}
        # error responses carry the total too (the middleware adds the header)
        ctx["server_timing"] = f"total;dur={math.ceil((time.perf_counter() - t0) * 1e6) / 1000:.3f}"
        raise
    except ClientDisconnect:
        # Nobody is listening: answer nothing useful, but end the request cleanly.
        status = CLIENT_CLOSED
        ctx["log"] = {"api": api, "activation": label, "error": "client_closed"}
        return Response(status_code=CLIENT_CLOSED)
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        if result is not None:
            _release(result)  # no response took the lent memory
        if lent is not None:
            lent.release()  # a no-op when the job took the slot
        svc.bodies.release(granted)
        now = time.perf_counter()
        recorder.record(api, label, status, total=now - t0, decode=t_decoded - t0,
                        encode=now - t_computed if result is not None else 0.0, job=job,
                        result=result, bytes_in=bytes_in, bytes_out=bytes_out)


def _lend(engine: Engine, codec: Codec, wire: Wire, request: Request, size: int | None):
    """Room the engine lends to read a large plain binary body into, or None."""
    if size is None or size < LEND_BYTES:
        return None
    if request.headers.get("content-encoding", "identity").strip().lower() not in (
            "", "identity"):
        return None
    at = codec.tensor_at(wire)
    if at is None or at > size:
        return None
    return engine.lend_body(size, at)


async def _wait(engine: Engine, job: Job, receive) -> JobResult:
    """Queue ``job`` and wait for its answer. A client that disconnects while its job waits
    frees its queue slot at once and its work is skipped if not yet started
    (``ClientDisconnect`` is raised). The disconnect watcher starts only once a job has
    waited ``WATCH_AFTER_S``: most answers come sooner, and then no watcher task is made."""
    fut = engine.submit(job)
    watch: list[asyncio.Task] = []

    def start_watch() -> None:
        w = asyncio.ensure_future(_until_disconnect(receive))
        w.add_done_callback(lambda t: t.cancelled() or engine.abandon(job))
        watch.append(w)

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watch)
    try:
        return await fut
    except asyncio.CancelledError:
        engine.abandon(job)  # the batcher skips it if it has not started
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            _release(fut.result())  # answered, but nobody will send it
        if watch and watch[0].done() and not watch[0].cancelled():
            raise ClientDisconnect() from None
        raise
    finally:
        timer.cancel()
        if watch:
            watch[0].cancel()


def _release(result: JobResult) -> None:
    if result.release is not None:
        result.release()
        result.release = None


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
