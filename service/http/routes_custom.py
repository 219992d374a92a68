"""Custom activations at run time: ``POST /v1/activations`` registers an expression
(``engine/expressions.py``) after its probe and self-test pass in the compute threads;
``DELETE /v1/activations/{name}`` removes a custom one. Behind the API keys like every
API route (``middleware.py``). The registration is built and checked here (400s in this
process), then served server-wide by ``services.registrations`` (``registrations.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.codecs.jsonio import loads_object
from service.engine import custom
from service.errors import RequestTooLarge, UnsupportedMediaType
from service.http.body import declared_size, read_body

router = APIRouter(tags=["native"])
MAX_BODY = 16384


async def add(services, raw: object, where: str = "activation") -> dict:
    """Build, test and serve one custom activation; its catalogue entry."""
    return await services.registrations.add(raw, custom.build(raw, where))


@router.post("/v1/activations", status_code=201, summary="Register a custom activation")
async def register(request: Request) -> Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise UnsupportedMediaType("POST /v1/activations takes application/json")
    services = request.app.state.services
    # read like every other body: 413 over the limit (a declared length before a byte is
    # read), 408 when it has not arrived within body_timeout_s
    size = declared_size(request, MAX_BODY)
    try:
        body, _ = await read_body(request, size, MAX_BODY, services.settings.body_timeout_s)
    except RequestTooLarge:
        raise RequestTooLarge(f"a registration is at most {MAX_BODY} bytes") from None
    entry = await add(services, loads_object(bytes(body), 1000))
    return JSONResponse(entry, status_code=201)


@router.delete("/v1/activations/{name}", status_code=204, summary="Remove a custom activation")
async def unregister(name: str, request: Request) -> Response:
    await request.app.state.services.registrations.remove(name)
    return Response(status_code=204)
