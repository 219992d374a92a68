"""The KServe v2 / Open Inference Protocol API. Each activation is a model of that name,
with one version (``1``), one input (``input``) and one output (``output``) of any shape.

Inference goes through ``exchange.handle`` with the v2 codec, like the native API, so both
share the batcher, the metrics (api label ``v2``) and the statistics. Errors are ``{"error": "<message>"}``
(``service.http.error_responses``); success is exactly 200.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.codecs import v2
from service.codecs.base import Wire
from service.engine.activations import Activation
from service.engine.engine import Engine
from service.errors import NotReady, UnknownActivation, echo
from service.http import cluster_view
from service.http.exchange import handle
from service.http.routes_shm import caller_regions

router = APIRouter(prefix="/v2", tags=["v2"])



def _engine(request: Request) -> Engine:
    return request.app.state.services.engine


def _model(engine: Engine, name: str, version: str | None = None) -> Activation:
    activation = engine.registry.get(name)
    if version is not None and version != v2.MODEL_VERSION:
        raise UnknownActivation(
            f"model {name!r} has no version {echo(version)}; its one version is "
            f"{v2.MODEL_VERSION!r}"
        )
    return activation


def _ready(engine: Engine) -> None:
    if not engine.ready:
        raise NotReady(f"the server is not ready ({engine.not_ready_reason()})")


# -- inference (declared first: the hot path is matched before the other routes) ------------
@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor extension)")
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a model version")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    headers = request.headers
    regions, cuda = caller_regions(request)  # the caller's own (per API key)
    wire = Wire(header_length=headers.get(v2.HEADER),
                accept_encoding=headers.get("accept-encoding"), version=version,
                content_type=headers.get("content-type"), regions=regions, cuda_regions=cuda)
    return await handle(request, v2.CODEC, name, wire)


# -- server --------------------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict:
    return {"name": "actserve", "version": __version__,
            "extensions": v2.extensions(request.app.state.services.settings.shared_memory,
                                        bool(request.app.state.services.cuda_regions.cuda_ids))}


@router.get("/health/live", summary="Liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness")
async def ready(request: Request) -> dict:
    _ready(_engine(request))
    if others := cluster_view.workers_not_ready(request):
        raise NotReady(f"the server is not ready (worker slot(s) {others})")
    return {"ready": True}


# -- statistics (declared before /models/{name} so "stats" is not taken for a model; a custom
# activation cannot be named "stats": service.validation.RESERVED_NAMES) ---------------------
@router.get("/models/stats", summary="Statistics of every model")
async def all_stats(request: Request) -> dict:
    stats = request.app.state.services.recorder.model_stats
    return await cluster_view.model_stats(request, stats.snapshot())


@router.get("/models/{name}/stats", summary="Statistics of one model")
async def model_stats(name: str, request: Request) -> dict:
    stats = request.app.state.services.recorder.model_stats
    act = _model(_engine(request), name).name
    return await cluster_view.model_stats(request, stats.snapshot(act), act)


@router.get("/models/{name}/versions/{version}/stats", summary="Statistics of one model version")
async def model_version_stats(name: str, version: str, request: Request) -> dict:
    stats = request.app.state.services.recorder.model_stats
    act = _model(_engine(request), name, version).name
    return await cluster_view.model_stats(request, stats.snapshot(act), act)


# -- model metadata and readiness -----------------------------------------------------------
def _metadata(engine: Engine, name: str, version: str | None) -> dict:
    act = _model(engine, name, version)
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
    return _metadata(_engine(request), name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    return _metadata(_engine(request), name, version)


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, request: Request) -> dict:
    engine = _engine(request)
    act = _model(engine, name)
    _ready(engine)
    return {"name": act.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, request: Request) -> dict:
    engine = _engine(request)
    act = _model(engine, name, version)
    _ready(engine)
    return {"name": act.name, "ready": True}
