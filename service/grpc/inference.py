"""One gRPC inference request's path, unary or in Triton's stream, step for step the HTTP
path (``service.http.exchange``): overload check, decode and validate with the v2 codec's
functions (``codec.decode``, ``v2.build_job``), ``engine.submit``, encode, and one
``Recorder.record`` with api ``grpc``; timings go back as trailing metadata."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import orjson

from service.codecs import v2
from service.codecs.shm_regions import SystemRegions
from service.engine.engine import Engine
from service.errors import ActserveError
from service.grpc import codec, messages
from service.observability.recorder import Recorder
from service.settings import Settings

log = logging.getLogger("actserve")
access_log = logging.getLogger("actserve.access")
CANCELLED = 499  # the client went away (nginx's convention, as over HTTP)


def _timing(decode: float, queue: float, compute: float, encode: float, total: float) -> str:
    parts = [(n, math.floor(v * 1e6)) for n, v in
             (("decode", decode), ("queue", queue), ("compute", compute), ("encode", encode))]
    parts.append(("total", math.ceil(total * 1e6)))
    return ", ".join(f"{n};dur={us / 1000:.3f}" for n, us in parts)


class Inference:
    def __init__(self, settings: Settings, engine: Engine, recorder: Recorder,
                 regions: SystemRegions, traces=None, cuda=None) -> None:
        self.settings = settings
        self.cuda = cuda  # CUDA shared-memory regions (cuda_regions.py)
        self.traces = traces  # profiled requests' Chrome traces (service/http/traces.py)
        self.engine = engine
        self.recorder = recorder
        self.regions = regions

    async def run(self, request) -> tuple[object, tuple]:
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
            req = codec.decode(request, self.settings.max_batch_elements, self.regions,
                               self.cuda)
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
            if "profile" in result.reports and self.traces is not None:
                await asyncio.to_thread(self.traces.keep, result.reports)
            if job.lab:
                response = codec.encode_lab(activation.name, req, job, result)
            else:
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

    async def stream(self, request_iterator):
        """Triton's ModelStreamInfer: requests are run concurrently as they arrive and each
        answer (or its error, in ``error_message``) is yielded when it is ready."""
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        stream_response = messages.ModelStreamInferResponse

        async def one(request) -> None:
            try:
                response, _ = await self.run(request)
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
