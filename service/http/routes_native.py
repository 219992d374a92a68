"""The native API: ``POST /v1/activations/{name}`` (JSON or raw bytes) and the catalogue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import dtypes
from service.codecs.native import NativeBinary, NativeJson, parse_query
from service.engine.job import Job, JobResult
from service.errors import UnsupportedMediaType, echo
from service.http.exchange import handle

router = APIRouter(tags=["native"])

JSON_TYPES = ("application/json", "")
BINARY_TYPES = ("application/octet-stream",)


@router.get("/v1/activations", summary="The activation catalogue")
async def catalogue(request: Request) -> dict:
    rt = request.app.state.runtime
    return {
        "activations": [a.describe() for a in rt.registry],
        "dtypes": list(dtypes.NAMES),
        "devices": rt.devices,
        "unsupported": rt.capabilities.unsupported(),
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
    rt = request.app.state.runtime  # unknown names: 404 (UnknownActivation)
    entry = rt.registry.get(name).describe()
    return {**entry, "unsupported": [u for u in rt.capabilities.unsupported() if u["activation"] == name]}


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
    rt = request.app.state.runtime
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    max_el = rt.settings.max_batch_elements
    activation = rt.registry.get(name) if name in rt.registry else None

    if ctype in BINARY_TYPES:
        def decode(body: bytearray) -> Job:
            act = rt.registry.get(name)
            query = parse_query(request.scope["query_string"])
            array, wire, settings, params = NativeBinary.decode(body, query, max_el)
            return rt.jobs.build(act, array, wire, settings, params, api="native")

        def encode(job: Job, result: JobResult) -> Response:
            payload, headers = NativeBinary.encode(result.array, result.dtype)
            return Response(payload, media_type="application/octet-stream", headers=headers)
    elif ctype in JSON_TYPES:
        def decode(body: bytearray) -> Job:
            act = rt.registry.get(name)
            array, wire, settings, params = NativeJson.decode(body, max_el)
            return rt.jobs.build(act, array, wire, settings, params, api="native")

        def encode(job: Job, result: JobResult) -> Response:
            return Response(NativeJson.encode(name, result.array, result.dtype),
                            media_type="application/json")
    else:
        def decode(body: bytearray) -> Job:
            raise UnsupportedMediaType(
                f"Content-Type {echo(ctype)} is not supported; use application/json or "
                "application/octet-stream"
            )

        encode = None  # never reached
    return await handle(request, "native", activation.name if activation else None, decode, encode)
