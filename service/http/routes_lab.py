"""The lab's read-only routes (docs/lab.md): an activation's accuracy table and the Chrome
traces of profiled requests."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.errors import UnknownActivation, echo

router = APIRouter(tags=["lab"])


@router.get("/v1/activations/{name}/accuracy",
            summary="Errors of an activation on a fixed grid, per dtype and AMP setting")
async def accuracy(name: str, request: Request) -> Response:
    engine = request.app.state.services.engine
    return JSONResponse(await engine.accuracy(name))


@router.get("/v1/profiles/{trace_id}", summary="The Chrome trace of a profiled request")
async def trace(trace_id: str, request: Request) -> Response:
    data = await asyncio.to_thread(request.app.state.services.traces.get, trace_id)
    if data is None:
        raise UnknownActivation(f"no profile trace {echo(trace_id)}: traces are kept for "
                                f"{request.app.state.services.settings.profile_trace_ttl_s:g} s "
                                "after the request")
    return Response(data, media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{trace_id}.json"'})
