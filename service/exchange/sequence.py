"""One activation request's path, the same for every transport (HTTP native, HTTP v2, gRPC
unary and stream), in one direction:

    admit -> charge the body to the byte budget -> read it -> codec decode -> engine.submit
    -> wait -> codec encode -> respond; recorder.record once, the access-log fields once

A transport is a ``Source``: it knows how to read its body or message, decode it with its
codec, wait (watching its own kind of disconnect), encode and build its own response. This
module owns the order, the budget, the timings (``Server-Timing``, batch headers), the
refusal counting and the record, so a protection added here covers every transport. Each
phase is timed with locals. Event loop only; no torch.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Protocol

from service.engine.job import Job, JobResult
from service.engine.jobs import ARRIVED
from service.errors import ActserveError, DeadlineExceeded
from service.exchange import request_start
from service.exchange.services import Services

CLIENT_CLOSED = 499  # the client went away before its answer (nginx's convention)
_ANSWER_LATE = ("the request's deadline passed while its answer was made ready (the server "
                "is overloaded); the answer was dropped")


class ClientGone(Exception):
    """The client went away while its request was read or waited for."""


class Source(Protocol):
    """What a transport supplies for one request."""

    api: str  # the metrics label: native, v2 or grpc
    arrived: float  # when the request arrived (time.monotonic): its deadline counts from it

    def hint(self, now: float) -> Any:
        """What admission may know before the body is read (``admission.hint_from``), its
        deadline counted from ``now``; None when nothing is worth checking yet."""
        ...

    def declared_size(self, limit: int) -> int | None:
        """The body's size in bytes when known before it is read (refusing one over
        ``limit``), else None: the budget is charged the limit."""
        ...

    def lend(self, engine, size: int | None) -> Any:
        """Engine memory to read the body straight into, or None."""
        ...

    async def read(self, size: int | None, granted: int, lent: Any) -> tuple[Any, int, int]:
        """(the body, bytes now granted by the budget, bytes received)."""
        ...

    async def decode(self, body: Any, activation, jobs) -> tuple[Job, Any]:
        ...

    async def wait(self, engine, job: Job) -> JobResult:
        """The job's result; ``ClientGone`` when the client left while it waited."""
        ...

    async def encode(self, job: Job, answer: Any, result: JobResult) -> Any:
        """The answer in the transport's format; it has an ``nbytes``."""
        ...

    def respond(self, encoded: Any, result: JobResult, headers: list[tuple[str, str]]) -> Any:
        """The transport's response, owning ``result.release`` from now on (set it to None
        if taken)."""
        ...

    def gone(self) -> Any:
        """The response to a client that went away."""
        ...


def server_timing(decode: float, queue: float, compute: float, encode: float,
                  total: float) -> str:
    """Milliseconds to the microsecond: parts rounded down and the total up, so the parts
    never add up to more than the total on the wire either. (One f-string: every answer
    carries it.)"""
    floor = math.floor
    return (f"decode;dur={floor(decode * 1e6) / 1000:.3f}, "
            f"queue;dur={floor(queue * 1e6) / 1000:.3f}, "
            f"compute;dur={floor(compute * 1e6) / 1000:.3f}, "
            f"encode;dur={floor(encode * 1e6) / 1000:.3f}, "
            f"total;dur={math.ceil(total * 1e6) / 1000:.3f}")


async def run(svc: Services, source: Source, name: str, ctx: dict) -> Any:
    """One request through the sequence; the transport's response. ``ctx`` is the
    request's context: ``request_id`` in, the access-log fields (``log``) and, on a refusal,
    ``server_timing`` out. An ``ActserveError`` is counted and re-raised for the transport
    to answer with its own error format."""
    engine, recorder, settings = svc.engine, svc.recorder, svc.settings
    api = source.api
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
    stage = "before_body"  # where an overload refusal is made (metrics.STAGES)
    try:
        limit = settings.max_request_bytes
        size = source.declared_size(limit)  # refused here if it cannot be read at all (413)
        arrived = source.arrived
        t0_mono = time.monotonic()  # waited since its arrival: the event loop's delay
        ARRIVED.set(arrived)  # the job's deadline counts from the request's arrival
        hint = source.hint(arrived)
        if hint is not None and hint.timed and hint.deadline <= t0_mono:
            raise DeadlineExceeded(request_start.STALE)  # its caller's stamp is that old
        engine.admit(hint)  # overload refused before the body is read
        # unknown (chunked) size: claim the limit; no waiting for room past the deadline
        granted = await svc.bodies.acquire(
            limit if size is None else size, settings.body_timeout_s,
            None if hint is None or hint.deadline is None else hint.deadline - t0_mono)
        lent = source.lend(engine, size)
        body, granted, bytes_in = await source.read(size, granted, lent)
        stage = "queued"
        if activation is None:
            activation = engine.registry.get(name)  # raises UnknownActivation
        job, answer = await source.decode(body, activation, engine.jobs)
        job.request_id = ctx.get("request_id", "")
        t_decoded = time.perf_counter()
        result = await source.wait(engine, job)
        stage = "answer"
        t_computed = time.perf_counter()
        if "profile" in result.reports and svc.traces is not None:
            await asyncio.to_thread(svc.traces.keep, result.reports)
        encoded = await source.encode(job, answer, result)
        t_end = time.perf_counter()
        if job.deadline <= time.monotonic():  # never a 200 after the deadline
            raise DeadlineExceeded(_ANSWER_LATE)
        bytes_out = encoded.nbytes
        headers = [  # (lower-case name, value)
            ("server-timing", server_timing(t_decoded - t0, result.queue_s, result.compute_s,
                                            t_end - t_computed, t_end - t0)),
            ("x-batch-size", str(result.batch_requests)),
            ("x-batch-elements", str(result.batch_elements)),
        ]
        response = source.respond(encoded, result, headers)
        status = getattr(response, "status_code", 200)
        if svc.shed is not None:  # how long it waited in the server: the refusals' signal
            svc.shed.observe(t0_mono - arrived + result.queue_s)
        access = svc.access_log
        if access is not None and access.enabled():  # the fields only a log line reads
            ctx["log"] = {
                "api": api, "activation": label, "shape": list(job.array.shape),
                "dtype": job.wire_dtype, "compute_dtype": job.compute_dtype,
                "out_dtype": result.dtype, "amp": job.mode.amp, "inplace": job.mode.inplace,
                "batch": result.batch_requests,
                "decode_ms": round((t_decoded - t0) * 1000, 3),
                "queue_ms": round(result.queue_s * 1000, 3),
                "compute_ms": round(result.compute_s * 1000, 3),
                "encode_ms": round((t_end - t_computed) * 1000, 3),
            }
        return response
    except ActserveError as exc:
        status = exc.status
        recorder.reject(exc, stage)
        if svc.shed is not None and status in (503, 504):  # overload: all it spent, waiting
            svc.shed.observe(time.monotonic() - source.arrived, served=False)
        ctx["log"] = {"api": api, "activation": label, "error": exc.type}
        # error answers carry the total too (the transport adds it)
        ctx["server_timing"] = f"total;dur={math.ceil((time.perf_counter() - t0) * 1e6) / 1000:.3f}"
        raise
    except ClientGone:
        # Nobody is listening: answer nothing useful, but end the request cleanly.
        status = CLIENT_CLOSED
        ctx["log"] = {"api": api, "activation": label, "error": "client_closed"}
        return source.gone()
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        if result is not None and result.release is not None:
            release(result)  # no response took the lent memory
        if lent is not None:
            lent.release()  # a no-op when the job took the slot
        svc.bodies.release(granted)
        now = time.perf_counter()
        recorder.record(api, label, status, total=now - t0, decode=t_decoded - t0,
                        encode=now - t_computed if result is not None else 0.0, job=job,
                        result=result, bytes_in=bytes_in, bytes_out=bytes_out)


def release(result: JobResult) -> None:
    if result.release is not None:
        result.release()
        result.release = None
