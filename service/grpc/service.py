"""The ``inference.GRPCInferenceService`` RPCs: health, metadata, inference (unary and
Triton's bidirectional stream), statistics and the shared-memory extensions.

Inference is ``service.grpc.inference`` (the shared request sequence). Errors become the gRPC
status code ``service.errors.WIRE_TABLE`` puts beside their HTTP status, with the HTTP
message. With API keys configured every RPC but ServerLive and ServerReady needs
``authorization: Bearer <key>`` metadata, checked by the same function as HTTP's header
(``service.exchange.auth``); shared-memory regions are then the caller's own, as over HTTP.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import json_format

from service import __version__
from service.codecs import v2
from service.codecs.shm_regions import owner_of
from service.errors import ActserveError, Unauthorized, grpc_code
from service.exchange import request_start
from service.exchange.auth import authorised
from service.exchange.services import Services
from service.grpc import codec, messages
from service.grpc.inference import Inference

log = logging.getLogger("actserve")

OPEN = ("ServerLive", "ServerReady")
RAW = ("ModelInfer", "ModelStreamInfer")  # parsed by Inference: malformed is INVALID_ARGUMENT


def code_of(exc: ActserveError) -> grpc.StatusCode:
    return grpc.StatusCode[grpc_code(exc)]


class InferenceService:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.settings = svc.settings
        self.engine = svc.engine
        self.recorder = svc.recorder
        self.regions = svc.regions
        self.cuda = svc.cuda_regions
        self.keys = [k.encode() for k in svc.settings.api_key_list]
        self.inference = Inference(svc)

    # -- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _token(context) -> bytes | None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return value.encode("latin-1") if isinstance(value, str) else value
        return None

    def _started(self, context) -> str | None:
        """The call's ``x-request-start`` metadata when the server trusts it
        (``request_start.py``), else None (no metadata scan)."""
        if self.svc.starts is not None:
            for key, value in context.invocation_metadata() or ():
                if key == request_start.HEADER:
                    return value
        return None

    def _authorised(self, context) -> bool:
        # without keys every call is authorised: no metadata to scan (every request)
        return not self.keys or authorised(self._token(context), self.keys)

    def _owner(self, context) -> str | None:
        if not self.keys:
            return None
        _, _, token = (self._token(context) or b"").partition(b" ")
        return owner_of(token)

    def _regions(self, context):
        """The system regions as this caller sees them (its own, with API keys on)."""
        return self.regions.scoped(self._owner(context))

    def _cuda(self, context):
        """The CUDA regions as this caller sees them (its own, with API keys on)."""
        return self.cuda.scoped(self._owner(context))

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
            decode = None if name in RAW else req_cls.FromString  # None: the raw bytes
            if client_streams and server_streams:  # ModelStreamInfer
                table[name] = grpc.stream_stream_rpc_method_handler(
                    self.stream, request_deserializer=decode,
                    response_serializer=resp_cls.SerializeToString)
            else:
                fn = getattr(self, name)
                table[name] = grpc.unary_unary_rpc_method_handler(
                    self.wrap(name, fn), request_deserializer=decode,
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
            extensions=v2.extensions(self.settings.shared_memory, bool(self.cuda.cuda_ids)))

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
        for r in self._regions(context).status(request.name):
            entry = resp.regions[r["name"]]
            entry.name, entry.key = r["name"], r["key"]
            entry.offset, entry.byte_size = r["offset"], r["byte_size"]
        return resp

    async def SystemSharedMemoryRegister(self, request, context):
        self._regions(context).register(request.name, request.key, request.offset,
                                        request.byte_size)
        return messages.message("SystemSharedMemoryRegisterResponse")()

    async def SystemSharedMemoryUnregister(self, request, context):
        self._regions(context).unregister(request.name)
        return messages.message("SystemSharedMemoryUnregisterResponse")()

    async def CudaSharedMemoryStatus(self, request, context):
        resp = messages.message("CudaSharedMemoryStatusResponse")()
        for r in self._cuda(context).status(request.name):
            entry = resp.regions[r["name"]]
            entry.name, entry.device_id, entry.byte_size = (r["name"], r["device_id"],
                                                            r["byte_size"])
        return resp

    async def CudaSharedMemoryRegister(self, request, context):
        await self._cuda(context).register(request.name, request.raw_handle,
                                           request.device_id, request.byte_size)
        return messages.message("CudaSharedMemoryRegisterResponse")()

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._cuda(context).unregister(request.name)
        return messages.message("CudaSharedMemoryUnregisterResponse")()

    # -- inference ----------------------------------------------------------------------------
    def _scopes(self, context) -> tuple:
        """(system regions, CUDA regions) as this caller sees them, its owner worked out
        once (an inference request names either)."""
        if not self.keys:  # one namespace: nothing to work out for every request
            return self.regions, self.cuda
        who = self._owner(context)
        return self.regions.scoped(who), self.cuda.scoped(who)

    async def ModelInfer(self, raw: bytes, context):
        regions, cuda = self._scopes(context)
        response, trailing = await self.inference.run(raw, context.peer(), regions=regions,
                                                      cuda=cuda,
                                                      remaining_s=context.time_remaining(),
                                                      started=self._started(context))
        if isinstance(response, ActserveError):
            raise response
        context.set_trailing_metadata(trailing)
        return response

    async def stream(self, raw_iterator, context):
        """Triton's ModelStreamInfer (``Inference.stream``), behind the same auth."""
        if not self._authorised(context):
            self.recorder.reject(Unauthorized("unauthorized"))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token (authorization: Bearer ...)")
        regions, cuda = self._scopes(context)
        async for item in self.inference.stream(raw_iterator, context.peer(), regions=regions,
                                                cuda=cuda):
            yield item
