"""The ``inference.GRPCInferenceService`` RPCs: health, metadata, inference (unary and
Triton's bidirectional stream), statistics and the shared-memory extensions.

Inference follows the HTTP path (``service.http.exchange``) step for step: overload check,
decode and validate with the v2 codec's functions, ``engine.submit``, encode, and one
``Recorder.record`` with api ``grpc``. Errors become gRPC status codes with the HTTP message
(``CODES``); timings go back as trailing metadata (``server-timing``, ``x-batch-size``,
``x-batch-elements``). With API keys configured every RPC but ServerLive and ServerReady
needs ``authorization: Bearer <key>`` metadata.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time

import grpc
import orjson
from google.protobuf import json_format

from service import __version__
from service.codecs import v2
from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import SystemRegions
from service.engine.engine import Engine
from service.errors import ActserveError, Unauthorized
from service.grpc import codec, messages
from service.observability.recorder import Recorder
from service.settings import Settings

log = logging.getLogger("actserve")
access_log = logging.getLogger("actserve.access")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
OPEN = ("ServerLive", "ServerReady")
CANCELLED = 499


def code_of(exc: ActserveError) -> grpc.StatusCode:
    return CODES.get(exc.status, grpc.StatusCode.INTERNAL)


def _timing(decode: float, queue: float, compute: float, encode: float, total: float) -> str:
    parts = [(n, math.floor(v * 1e6)) for n, v in
             (("decode", decode), ("queue", queue), ("compute", compute), ("encode", encode))]
    parts.append(("total", math.ceil(total * 1e6)))
    return ", ".join(f"{n};dur={us / 1000:.3f}" for n, us in parts)


class InferenceService:
    def __init__(self, settings: Settings, engine: Engine, recorder: Recorder,
                 regions: SystemRegions, cuda_regions: CudaRegions) -> None:
        self.settings = settings
        self.engine = engine
        self.recorder = recorder
        self.regions = regions
        self.cuda = cuda_regions
        self.keys = [k.encode() for k in settings.api_key_list]

    # -- plumbing ---------------------------------------------------------------------------
    def _authorised(self, context) -> bool:
        if not self.keys:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return False
                ok = False
                for k in self.keys:
                    ok |= hmac.compare_digest(token.strip().encode(), k)
                return ok
        return False

    def wrap(self, name: str, fn):
        """``fn(request, context)`` with auth and the error table around it."""

        async def unary(request, context):
            if name not in OPEN and not self._authorised(context):
                self.recorder.reject(Unauthorized("unauthorized"))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or invalid bearer token (authorization: Bearer ...)")
            try:
                return await fn(request, context)
            except ActserveError as exc:
                code, message = code_of(exc), exc.message
            except Exception:
                log.exception("gRPC %s failed", name)
                code, message = grpc.StatusCode.INTERNAL, f"internal error in {name}"
            await context.abort(code, message)

        return unary

    def handler(self) -> grpc.GenericRpcHandler:
        table = {}
        for name, client_streams, server_streams in messages.methods():
            req_cls, resp_cls = messages.method_types(name)
            if client_streams and server_streams:  # ModelStreamInfer
                table[name] = grpc.stream_stream_rpc_method_handler(
                    self.stream, request_deserializer=req_cls.FromString,
                    response_serializer=resp_cls.SerializeToString)
            else:
                fn = getattr(self, name)
                table[name] = grpc.unary_unary_rpc_method_handler(
                    self.wrap(name, fn), request_deserializer=req_cls.FromString,
                    response_serializer=resp_cls.SerializeToString)
        return grpc.method_handlers_generic_handler(messages.SERVICE, table)

    # -- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return messages.message("ServerLiveResponse")(live=True)

    async def ServerReady(self, request, context):
        return messages.message("ServerReadyResponse")(ready=self.engine.ready)

    async def ModelReady(self, request, context):
        act = self.engine.registry.find(request.name)
        known = act is not None and request.version in ("", v2.MODEL_VERSION)
        return messages.message("ModelReadyResponse")(ready=known and self.engine.ready)

    async def ServerMetadata(self, request, context):
        return messages.message("ServerMetadataResponse")(
            name="actserve", version=__version__,
            extensions=v2.extensions(self.settings.shared_memory))

    async def ModelMetadata(self, request, context):
        act = self._model(request.name, request.version)
        resp = messages.message("ModelMetadataResponse")(
            name=act.name, versions=[v2.MODEL_VERSION], platform=v2.PLATFORM)
        resp.inputs.add(name=v2.INPUT_NAME, datatype="FP32", shape=[-1])
        resp.outputs.add(name=v2.OUTPUT_NAME, datatype="FP32", shape=[-1])
        return resp

    async def ModelStatistics(self, request, context):
        name = None
        if request.name:
            name = self._model(request.name, request.version).name
        return json_format.ParseDict(self.recorder.model_stats.snapshot(name),
                                     messages.message("ModelStatisticsResponse")())

    def _model(self, name: str, version: str):
        act = self.engine.registry.get(name)  # UnknownActivation: NOT_FOUND
        codec.check_version(act.name, version)
        return act

    # -- shared memory ------------------------------------------------------------------------
    async def SystemSharedMemoryStatus(self, request, context):
        resp = messages.message("SystemSharedMemoryStatusResponse")()
        for r in self.regions.status(request.name):
            entry = resp.regions[r["name"]]
            entry.name, entry.key = r["name"], r["key"]
            entry.offset, entry.byte_size = r["offset"], r["byte_size"]
        return resp

    async def SystemSharedMemoryRegister(self, request, context):
        self.regions.register(request.name, request.key, request.offset, request.byte_size)
        return messages.message("SystemSharedMemoryRegisterResponse")()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.regions.unregister(request.name)
        return messages.message("SystemSharedMemoryUnregisterResponse")()

    async def CudaSharedMemoryStatus(self, request, context):
        self.cuda.status(request.name)
        return messages.message("CudaSharedMemoryStatusResponse")()

    async def CudaSharedMemoryRegister(self, request, context):
        self.cuda.register(request.name, request.raw_handle, request.device_id, request.byte_size)
        return messages.message("CudaSharedMemoryRegisterResponse")()

    async def CudaSharedMemoryUnregister(self, request, context):
        self.cuda.unregister(request.name)
        return messages.message("CudaSharedMemoryUnregisterResponse")()

    # -- inference ----------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        response, trailing = await self.infer(request)
        if isinstance(response, ActserveError):
            raise response
        context.set_trailing_metadata(trailing)
        return response

    async def infer(self, request) -> tuple[object, tuple]:
        """One request: (the response, trailing metadata) or (the error, ())."""
        engine, recorder = self.engine, self.recorder
        activation = engine.registry.find(request.model_name)
        label = activation.name if activation is not None else None
        t0 = time.perf_counter()
        recorder.request_started()
        job = result = None
        status = 500
        bytes_in = request.ByteSize() if recorder.metrics is not None else 0
        bytes_out = 0
        t_decoded = t_computed = t0
        try:
            engine.admit()
            if activation is None:
                activation = engine.registry.get(request.model_name)
            codec.check_version(activation.name, request.model_version)
            req = codec.decode(request, self.settings.max_batch_elements, self.regions)
            job = v2.build_job(activation, req, engine.jobs, "grpc")
            job.request_id = req.id or ""
            t_decoded = time.perf_counter()
            fut = engine.submit(job)
            try:
                result = await fut
            except asyncio.CancelledError:
                engine.abandon(job)
                raise
            t_computed = time.perf_counter()
            response = codec.encode(activation.name, req, result.array, result.dtype,
                                    self.regions)
            t_end = time.perf_counter()
            bytes_out = sum(len(b) for b in response.raw_output_contents)
            status = 200
            trailing = (
                ("server-timing", _timing(t_decoded - t0, result.queue_s, result.compute_s,
                                          t_end - t_computed, t_end - t0)),
                ("x-batch-size", str(result.batch_requests)),
                ("x-batch-elements", str(result.batch_elements)),
            )
            return response, trailing
        except ActserveError as exc:
            status = exc.status
            recorder.reject(exc)
            return exc, ()
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        finally:
            if result is not None and result.release is not None:
                result.release()  # the answer was copied into the response
                result.release = None
            now = time.perf_counter()
            recorder.record("grpc", label, status, total=now - t0, decode=t_decoded - t0,
                            encode=now - t_computed if result is not None else 0.0, job=job,
                            result=result, bytes_in=bytes_in, bytes_out=bytes_out)
            if self.settings.access_log and access_log.isEnabledFor(logging.INFO):
                access_log.info('{"api":"grpc","rpc":"ModelInfer","model":%s,"status":%d,'
                                '"ms":%.3f}', _json_str(request.model_name), status,
                                (now - t0) * 1000)

    async def stream(self, request_iterator, context):
        """Triton's ModelStreamInfer: requests are run concurrently as they arrive and each
        answer (or its error, in ``error_message``) is sent when it is ready."""
        if not self._authorised(context):
            self.recorder.reject(Unauthorized("unauthorized"))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token (authorization: Bearer ...)")
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        stream_response = messages.ModelStreamInferResponse

        async def one(request) -> None:
            try:
                response, _ = await self.infer(request)
            except Exception:  # a bug: answer it in the stream, keep the stream alive
                log.exception("stream request failed")
                response = ActserveError("internal error")
            if isinstance(response, ActserveError):
                await out.put(stream_response(error_message=response.message))
            else:
                await out.put(stream_response(infer_response=response))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
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
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


def _json_str(text: str) -> str:
    return orjson.dumps(text).decode()
