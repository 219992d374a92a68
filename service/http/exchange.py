"""The HTTP side of the one request sequence (``service.exchange.sequence``), shared by the
native and v2 routes (a route only picks the codec): ``HttpSource`` reads the body from the
ASGI stream (within the byte budget and the body deadline, into engine memory when it is
large plain binary), decodes and encodes off the loop when large, watches for a disconnect
while the job waits, and answers with a ``Response``. Order, budget, timings, refusal
counting and the record are the sequence's, the same for gRPC.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.codecs.base import Codec, Encoded, Wire
from service.engine.engine import Engine
from service.engine.job import Job, JobResult
from service.exchange import request_start, sequence
from service.exchange.sequence import CLIENT_CLOSED, ClientGone, release
from service.exchange.services import Services
from service.http.body import declared_size, read_body
from service.http.offload import decode_off_loop, encode_off_loop
from service.http.parts_response import PartsResponse
from service.http.shed import ARRIVAL_KEY, raw_hint

LEND_BYTES = 64 << 10  # binary bodies this large are read straight into engine memory
WATCH_AFTER_S = 0.5  # a job waiting longer than this gets a disconnect watcher


def to_response(answer: Encoded, release=None) -> Response:
    """The answer as a response; ``release`` (memory lent for the answer) runs after the
    last byte is sent."""
    if isinstance(answer.body, list) or release is not None:
        parts = answer.body if isinstance(answer.body, list) else [answer.body]
        return PartsResponse(parts, media_type=answer.media_type, headers=answer.headers,
                             release=release)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)


class HttpSource:
    """One HTTP request as a ``sequence.Source``."""

    __slots__ = ("api", "arrived", "codec", "name", "request", "settings", "svc", "wire")

    def __init__(self, request: Request, codec: Codec, name: str, wire: Wire,
                 svc: Services) -> None:
        self.request, self.codec, self.name, self.wire, self.svc = request, codec, name, wire, svc
        self.settings = svc.settings
        self.api = codec.api
        # stamped by the HTTP protocol as the request's first bytes were parsed
        # (``header_timeout.py``, the caller's stamp applied); now when another server
        # runs the app
        arrived = request.scope.get(ARRIVAL_KEY)
        if arrived is None:
            arrived = time.monotonic()
            if svc.starts is not None:
                arrived = svc.starts.apply(arrived, request.headers.get(request_start.HEADER))
        self.arrived = arrived

    def hint(self, now):
        """What admission may know before the body is read, read straight from the ASGI
        scope (the few query keys and headers it needs; no full parse on the hot path)."""
        scope = self.request.scope
        raw = scope["headers"]
        if not self.settings.fair_share:
            for key, value in raw:
                if key == b"content-length":
                    if value.isdigit() and int(value) < LEND_BYTES:
                        # a small body is read and decoded in microseconds, and ``submit``
                        # checks the prediction with the exact size right after: no
                        # pre-body check to pay for
                        return None
                    break
        client = scope.get("client")
        return raw_hint(self.name, self.api, scope["query_string"], raw,
                        client[0] if client else None, now, self.settings.default_timeout_s)

    def declared_size(self, limit: int) -> int | None:
        return declared_size(self.request, limit)

    def lend(self, engine: Engine, size: int | None):
        """Room the engine lends to read a large plain binary body into, or None."""
        if size is None or size < LEND_BYTES:
            return None
        if self.request.headers.get("content-encoding", "identity").strip().lower() not in (
                "", "identity"):
            return None
        at = self.codec.tensor_at(self.wire)
        if at is None or at > size:
            return None
        return engine.lend_body(size, at)

    async def read(self, size, granted, lent):
        s = self.settings
        try:
            body, granted = await read_body(self.request, size, s.max_request_bytes,
                                            s.body_timeout_s, self.svc.bodies, granted,
                                            s.min_body_rate_bytes_s, s.max_batch_elements,
                                            lent.view if lent is not None else None)
        except ClientDisconnect:
            raise ClientGone() from None
        return body, granted, len(body)

    async def decode(self, body, activation, jobs):
        job, answer = await decode_off_loop(self.request, self.codec.decode, body, self.wire,
                                            activation, jobs)
        if self.settings.fault_injection:
            job.fault = self.request.headers.get("x-actserve-fault")
        return job, answer

    async def wait(self, engine: Engine, job: Job) -> JobResult:
        """Queue ``job`` and wait for its answer. A client that disconnects while its job
        waits frees its queue slot at once and its work is skipped if not yet started
        (``ClientGone``). The disconnect watcher starts only once a job has waited
        ``WATCH_AFTER_S``: most answers come sooner, and then no watcher task is made."""
        fut = engine.submit(job)
        watch: list[asyncio.Task] = []
        receive = self.request.receive

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
                release(fut.result())  # answered, but nobody will send it
            if watch and watch[0].done() and not watch[0].cancelled():
                raise ClientGone() from None
            raise
        finally:
            timer.cancel()
            if watch:
                watch[0].cancel()

    async def encode(self, job, answer, result):
        return await encode_off_loop(self.request, self.codec.encode, job, answer, result)

    def respond(self, encoded: Encoded, result: JobResult, headers: list[tuple[str, str]]):
        response = to_response(encoded, result.release)
        result.release = None  # the response owns it now
        raw = response.raw_headers  # names new to this response: appended, not searched
        for name, value in headers:
            raw.append((name.encode("latin-1"), value.encode("latin-1")))
        return response

    def gone(self):
        return Response(status_code=CLIENT_CLOSED)


async def handle(request: Request, codec: Codec, name: str, wire: Wire) -> Response:
    svc: Services = request.app.state.services
    ctx = request.scope.get("actserve", {})
    return await sequence.run(svc, HttpSource(request, codec, name, wire, svc), name, ctx)


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
