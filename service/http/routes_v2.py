"""The KServe v2 / Open Inference Protocol API. Each activation is a model of that name,
with one version (``1``), one input (``input``) and one output (``output``) of any shape.

Inference goes through ``exchange.handle`` like the native API, so both share the batcher,
the metrics (api label ``v2``) and the statistics. Errors are ``{"error": "<message>"}``
(``service.http.error_responses``); success is exactly 200.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.codecs import v2
from service.engine.job import Job, JobResult
from service.engine.runtime import Runtime
from service.errors import InvalidRequest, NotReady, UnknownActivation, echo
from service.http import cluster_view
from service.http.exchange import handle
from service.http.parts_response import PartsResponse

router = APIRouter(prefix="/v2", tags=["v2"])

EXTENSIONS = ["binary_tensor_data", "parameters", "statistics"]


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _model(rt: Runtime, name: str, version: str | None = None):
    activation = rt.registry.get(name)
    if version is not None and version != v2.MODEL_VERSION:
        raise UnknownActivation(
            f"model {name!r} has no version {echo(version)}; its one version is "
            f"{v2.MODEL_VERSION!r}"
        )
    return activation


def _ready(rt: Runtime) -> None:
    if not rt.ready:
        reason = "draining" if rt.batcher.draining else "warming up or restarting"
        raise NotReady(f"the server is not ready ({reason})")


# -- inference (declared first: the hot path is matched before the other routes) ------------
@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor extension)")
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a model version")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    rt = _runtime(request)
    known = name in rt.registry
    decoded: list[v2.V2Request] = []
    compression = v2.accepted_encoding(request.headers.get("accept-encoding"))

    def decode(body: bytearray) -> Job:
        act = _model(rt, name, version)
        req = v2.decode(body, request.headers.get(v2.HEADER), rt.settings.max_batch_elements)
        job = rt.jobs.build(act, req.array, req.wire, req.settings, req.params, api="v2",
                            timeout_unit_s=1e-6, where="parameters")
        if not req.binary_output and not job.mode.amp:
            # The output dtype is known before compute: refuse now, not after.
            problem = v2.json_output_problem(job.compute_dtype)
            if problem:
                raise InvalidRequest(problem)
        decoded.append(req)
        return job

    def encode(job: Job, result: JobResult) -> Response:
        body, headers = v2.encode(name, decoded[0], result.array, result.dtype)
        media = headers.pop("Content-Type")
        if compression is not None:
            if isinstance(body, list):
                body = b"".join(body)
            body = v2.compress(body, compression)
            headers["Content-Encoding"] = compression
        if isinstance(body, list):
            return PartsResponse(body, media_type=media, headers=headers)
        return Response(body, status_code=200, media_type=media, headers=headers)

    return await handle(request, "v2", name if known else None, decode, encode)


# -- server --------------------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "actserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness")
async def ready(request: Request) -> dict:
    _ready(_runtime(request))
    if others := cluster_view.workers_not_ready(request):
        raise NotReady(f"the server is not ready (worker slot(s) {others})")
    return {"ready": True}


# -- statistics (declared before /models/{name} so "stats" is not taken for a model) --------
@router.get("/models/stats", summary="Statistics of every model")
async def all_stats(request: Request) -> dict:
    return await cluster_view.model_stats(request, _runtime(request).model_stats.snapshot())


@router.get("/models/{name}/stats", summary="Statistics of one model")
async def model_stats(name: str, request: Request) -> dict:
    rt = _runtime(request)
    act = _model(rt, name).name
    return await cluster_view.model_stats(request, rt.model_stats.snapshot(act), act)


@router.get("/models/{name}/versions/{version}/stats", summary="Statistics of one model version")
async def model_version_stats(name: str, version: str, request: Request) -> dict:
    rt = _runtime(request)
    act = _model(rt, name, version).name
    return await cluster_view.model_stats(request, rt.model_stats.snapshot(act), act)


# -- model metadata and readiness -----------------------------------------------------------
def _metadata(rt: Runtime, name: str, version: str | None) -> dict:
    act = _model(rt, name, version)
    datatypes = ",".join(v2.DATATYPES)
    params: dict[str, object] = {"formula": act.formula, "inplace_supported": act.supports_inplace}
    params.update({p.name: p.default for p in act.params})
    return {
        "name": act.name,
        "versions": [v2.MODEL_VERSION],
        "platform": v2.PLATFORM,
        "inputs": [{"name": v2.INPUT_NAME, "datatype": "FP32", "shape": [-1],
                    "parameters": {"datatypes": datatypes}}],
        "outputs": [{"name": v2.OUTPUT_NAME, "datatype": "FP32", "shape": [-1],
                     "parameters": {"datatypes": datatypes}}],
        "parameters": params,
    }


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, request: Request) -> dict:
    return _metadata(_runtime(request), name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    return _metadata(_runtime(request), name, version)


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, request: Request) -> dict:
    rt = _runtime(request)
    act = _model(rt, name)
    _ready(rt)
    return {"name": act.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, request: Request) -> dict:
    rt = _runtime(request)
    act = _model(rt, name, version)
    _ready(rt)
    return {"name": act.name, "ready": True}
