"""Custom activations at run time: ``POST /v1/activations`` registers an expression
(``engine/expressions.py``) after its probe and self-test pass in the compute threads;
``DELETE /v1/activations/{name}`` removes a custom one. Behind the API keys like every
API route (``middleware.py``)."""

from __future__ import annotations

import tomllib
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.codecs.jsonio import loads_object
from service.engine import custom
from service.engine.engine import Engine
from service.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

router = APIRouter(tags=["native"])
MAX_BODY = 16384


def _inline_engine(services) -> Engine:
    engine = services.engine
    if not isinstance(engine, Engine):
        raise InvalidRequest("custom activations need --engine inline: the shared engine "
                             "process (--engine process) serves the built-in ones only")
    return engine


async def add(services, raw: object, where: str = "activation") -> dict:
    """Build, test and serve one custom activation; its catalogue entry."""
    engine = _inline_engine(services)
    activation = custom.build(raw, where)
    await engine.register(activation)
    services.recorder.model_stats.add(activation.name)
    return activation.describe()


async def load_file(services, path: str) -> list[str]:
    """``--activations-file``: a TOML file of ``[[activation]]`` tables (name, expr,
    params); any problem stops start-up with the message."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    names = []
    for i, raw in enumerate(doc.get("activation", [])):
        names.append((await add(services, raw, f"{path}: activation[{i}]"))["name"])
    return names


@router.post("/v1/activations", status_code=201, summary="Register a custom activation")
async def register(request: Request) -> Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise UnsupportedMediaType("POST /v1/activations takes application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestTooLarge(f"a registration is at most {MAX_BODY} bytes")
    entry = await add(request.app.state.services, loads_object(bytes(body), 1000))
    return JSONResponse(entry, status_code=201)


@router.delete("/v1/activations/{name}", status_code=204, summary="Remove a custom activation")
async def unregister(name: str, request: Request) -> Response:
    services = request.app.state.services
    _inline_engine(services).unregister(name)
    services.recorder.model_stats.remove(name)
    return Response(status_code=204)
