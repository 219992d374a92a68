"""The native API: ``POST /v1/activations/{name}`` (JSON or raw bytes) and the catalogue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import dtypes
from service.codecs import native
from service.codecs.base import Wire
from service.engine import expressions
from service.engine.activations import INLINE
from service.http.exchange import handle

router = APIRouter(tags=["native"])


@router.get("/v1/activations", summary="The activation catalogue")
async def catalogue(request: Request) -> dict:
    engine = request.app.state.services.engine
    return {
        "activations": [*(a.describe() for a in engine.registry),
                        {**INLINE.describe(), "grammar": expressions.ALLOWED}],
        "dtypes": list(dtypes.NAMES),
        "devices": engine.devices,
        "unsupported": engine.capabilities.unsupported(),
        "settings": {
            "compute_dtype": "float32 | float16 | bfloat16 | float64 (default: the input's)",
            "amp": "run under torch.autocast (bf16 on CPU, fp16 on CUDA unless amp_dtype)",
            "amp_dtype": "float16 | bfloat16",
            "inplace": "use the in-place variant on the server's own staging copy",
            "timeout": "deadline in seconds (native) / microseconds (v2)",
            "priority": "integer; higher is taken first when the queue has a choice",
        },
    }


@router.get("/v1/activations/{name}", summary="One activation of the catalogue")
async def catalogue_entry(name: str, request: Request) -> dict:
    engine = request.app.state.services.engine  # unknown names: 404 (UnknownActivation)
    entry = engine.registry.get(name).describe()
    return {**entry, "unsupported": [u for u in engine.capabilities.unsupported()
                                     if u["activation"] == name]}


@router.post(
    "/v1/activations/{name}",
    summary="Apply an activation",
    openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": {"type": "object", "required": ["data"], "properties": {
            "data": {}, "shape": {"type": "array", "items": {"type": "integer"}},
            "dtype": {"type": "string", "enum": list(dtypes.NAMES)},
            "params": {"type": "object"}, "compute_dtype": {"type": "string"},
            "amp": {"type": "boolean"}, "inplace": {"type": "boolean"},
            "timeout": {"type": "number"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }, "required": True}},
)
async def activate(name: str, request: Request) -> Response:
    codec = native.for_content_type(request.headers.get("content-type", ""))
    return await handle(request, codec, name, Wire(query=request.scope["query_string"]))
