"""The gRPC side of the one request sequence (``service.exchange.sequence``): a
``ModelInferRequest`` is a ``GrpcSource``, and runs through the same admission, byte budget
(its message's bytes are charged like an HTTP body), decode (the v2 codec's functions via
``codec.decode`` and ``v2.build_job``), submit, encode, record and access-log line as an HTTP
request; timings go back as trailing metadata.

A request's deadline is the earliest of its ``timeout`` parameter, the server's default and
the client's gRPC deadline: a job whose caller has given up is never computed.

Messages arrive as raw bytes and are parsed here, so a malformed one is INVALID_ARGUMENT
with the parser's message. Triton's ModelStreamInfer runs a stream's requests concurrently,
at most ``grpc_stream_inflight`` of them at once (read, computing, or answered and not yet
taken by the client): the stream is read no further until one is taken, so a client that
sends without reading holds a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid

from google.protobuf.message import DecodeError

from service.codecs import v2
from service.errors import ActserveError, InvalidRequest, RequestTooLarge
from service.exchange import sequence
from service.exchange.services import Services
from service.grpc import codec, messages

log = logging.getLogger("actserve")
METHOD = "/inference.GRPCInferenceService/"


class GrpcSource:
    """One ``ModelInferRequest`` (already parsed; ``nbytes``: its size on the wire)."""

    api = "grpc"
    __slots__ = ("arrived", "cuda", "deadline", "model", "nbytes", "regions", "request", "svc")

    def __init__(self, request, nbytes: int, svc: Services, regions,
                 deadline: float | None = None, cuda=None, started: str | None = None) -> None:
        self.request, self.nbytes, self.svc = request, nbytes, svc
        self.arrived = time.monotonic()  # the message is whole: it arrived now
        if started is not None:  # or at the caller's trusted stamp, if earlier
            self.arrived = svc.starts.apply(self.arrived, started)
        self.cuda = svc.cuda_regions if cuda is None else cuda  # the caller's own
        self.deadline = deadline  # the client's gRPC deadline (time.monotonic), or None
        self.regions = regions  # the caller's own system regions
        self.model = request.model_name

    def hint(self, now):
        return None  # the message is here: its deadline and size are checked by decoding

    def declared_size(self, limit: int) -> int | None:
        if self.nbytes > limit:
            raise RequestTooLarge(f"message of {self.nbytes} bytes is over max_request_bytes "
                                  f"({limit})")
        return self.nbytes

    def lend(self, engine, size):
        return None

    async def read(self, size, granted, lent):
        return self.request, granted, self.nbytes

    async def decode(self, request, activation, jobs):
        codec.check_version(activation.name, request.model_version)
        self.model = activation.name  # the model asked for ("expr", not the expression)
        svc = self.svc
        req = codec.decode(request, svc.settings.max_batch_elements, self.regions,
                           self.cuda)
        job = v2.build_job(activation, req, jobs, "grpc")
        if self.deadline is not None and self.deadline < job.deadline:
            job.deadline = self.deadline  # never computed once the caller has given up
        return job, req

    async def wait(self, engine, job):
        fut = engine.submit(job)
        try:
            return await fut
        except asyncio.CancelledError:
            engine.abandon(job)
            raise

    async def encode(self, job, req, result):
        name = self.model
        if job.lab:
            response = codec.encode_lab(name, req, job, result)
        else:
            response = codec.encode(name, req, result.array, result.dtype, self.regions)
        return _Encoded(response, sum(len(b) for b in response.raw_output_contents))

    def respond(self, encoded, result, headers):
        return _Answer(encoded.response, tuple(headers))

    def gone(self):
        return None


class _Encoded:
    __slots__ = ("nbytes", "response")

    def __init__(self, response, nbytes: int) -> None:
        self.response, self.nbytes = response, nbytes


class _Answer:
    __slots__ = ("response", "trailing")
    status_code = 200

    def __init__(self, response, trailing) -> None:
        self.response, self.trailing = response, trailing


class Inference:
    """gRPC inference over the shared sequence: ``run`` (unary) and ``stream``."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._id_prefix = uuid.uuid4().hex[:12] + "-g"
        self._ids = itertools.count(1)
        self._request_cls = messages.message("ModelInferRequest")

    def parse(self, raw: bytes):
        try:
            return self._request_cls.FromString(raw)
        except DecodeError as exc:
            raise InvalidRequest(f"malformed ModelInferRequest: {exc}") from None

    async def run(self, raw: bytes, peer: str | None = None, rpc: str = "ModelInfer",
                  regions=None, remaining_s: float | None = None,
                  cuda=None, started: str | None = None) -> tuple[object, tuple]:
        """One request from its raw message: (the response, trailing metadata) or (the
        error, ()). ``started``: its trusted ``x-request-start`` (``request_start.py``)."""
        t0 = time.perf_counter()
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        ctx = {"request_id": f"{self._id_prefix}{next(self._ids):x}", "log": {}}
        status = 500
        try:
            request = self.parse(raw)
            ctx["request_id"] = request.id if 0 < len(request.id) <= 128 else ctx["request_id"]
            source = GrpcSource(request, len(raw), self.svc,
                                self.svc.regions if regions is None else regions, deadline,
                                cuda, started)
            answer = await sequence.run(self.svc, source, request.model_name, ctx)
            status = 200
            return answer.response, answer.trailing
        except ActserveError as exc:
            status = exc.status
            if not ctx["log"]:  # refused before the sequence (a malformed message)
                self.svc.recorder.reject(exc)
                ctx["log"] = {"api": "grpc", "error": exc.type}
            return exc, ()
        except asyncio.CancelledError:
            status = sequence.CLIENT_CLOSED
            raise
        finally:
            access = self.svc.access_log
            if access is not None and access.enabled():
                access.write({"id": ctx["request_id"], "client": peer, "transport": "grpc",
                              "method": rpc, "path": METHOD + rpc, "status": status,
                              "ms": round((time.perf_counter() - t0) * 1000, 3), **ctx["log"]})

    async def stream(self, raw_iterator, peer: str | None = None, regions=None, cuda=None):
        """Triton's ModelStreamInfer: requests run concurrently as they arrive, at most
        ``grpc_stream_inflight`` at once, and each answer (or its error, in
        ``error_message``) is yielded when it is ready."""
        limit = self.svc.settings.grpc_stream_inflight
        room = asyncio.Semaphore(limit)  # taken when read, given back when yielded
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        stream_response = messages.ModelStreamInferResponse

        async def one(raw: bytes) -> None:
            try:
                response, _ = await self.run(raw, peer, "ModelStreamInfer", regions,
                                             cuda=cuda)
            except Exception:  # a bug: answer it in the stream, keep the stream alive
                log.exception("stream request failed")
                response = ActserveError("internal error")
            if isinstance(response, ActserveError):
                out.put_nowait(stream_response(error_message=response.message))
            else:
                out.put_nowait(stream_response(infer_response=response))

        async def read() -> None:
            async for raw in raw_iterator:
                await room.acquire()  # no further reading until an answer is taken
                task = asyncio.ensure_future(one(raw))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending))
            await out.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
                room.release()
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
