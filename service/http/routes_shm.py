"""Triton's shared-memory extensions over HTTP: ``/v2/systemsharedmemory`` and
``/v2/cudasharedmemory`` (status, register, unregister; all regions or one). The regions
live in ``Services.regions`` / ``Services.cuda_regions``, shared with gRPC. Errors are v2
bodies (``{"error": ...}``); with API keys configured every call needs a key (middleware).
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request

from service.codecs.jsonio import loads_object
from service.errors import InvalidRequest
from service.http.body import declared_size, read_body

router = APIRouter(prefix="/v2", tags=["v2 shared memory"])
MAX_BODY = 64 * 1024


def _services(request: Request):
    return request.app.state.services


async def _json(request: Request) -> dict:
    """The small JSON body of a register call, read within ``MAX_BODY`` (413 beyond)."""
    size = declared_size(request, MAX_BODY)
    timeout = request.app.state.services.settings.body_timeout_s
    body, _ = await read_body(request, size, MAX_BODY, timeout)
    return loads_object(body) if body else {}


# -- system shared memory ------------------------------------------------------------------
@router.get("/systemsharedmemory/status", summary="Every system shared-memory region")
async def system_status(request: Request) -> list:
    return _services(request).regions.status()


@router.get("/systemsharedmemory/region/{name}/status", summary="One system shared-memory region")
async def system_region_status(name: str, request: Request) -> list:
    return _services(request).regions.status(name)


@router.post("/systemsharedmemory/region/{name}/register", summary="Register a region")
async def system_register(name: str, request: Request) -> dict:
    regions = _services(request).regions
    regions.check_enabled()  # refused before the body is read
    body = await _json(request)
    regions.register(name, body.get("key"), body.get("offset", 0), body.get("byte_size"))
    return {}


@router.post("/systemsharedmemory/unregister", summary="Unregister every region")
async def system_unregister_all(request: Request) -> dict:
    _services(request).regions.unregister("")
    return {}


@router.post("/systemsharedmemory/region/{name}/unregister", summary="Unregister a region")
async def system_unregister(name: str, request: Request) -> dict:
    _services(request).regions.unregister(name)
    return {}


# -- CUDA shared memory --------------------------------------------------------------------
@router.get("/cudasharedmemory/status", summary="Every CUDA shared-memory region")
async def cuda_status(request: Request) -> list:
    return _services(request).cuda_regions.status()


@router.get("/cudasharedmemory/region/{name}/status", summary="One CUDA shared-memory region")
async def cuda_region_status(name: str, request: Request) -> list:
    return _services(request).cuda_regions.status(name)


@router.post("/cudasharedmemory/region/{name}/register", summary="Register a CUDA region")
async def cuda_register(name: str, request: Request) -> dict:
    cuda = _services(request).cuda_regions
    cuda.refuse()  # refused before the body is read (no CUDA device, or turned off)
    body = await _json(request)
    handle = body.get("raw_handle")
    try:
        raw = base64.b64decode(handle["b64"], validate=True)
    except (TypeError, KeyError, binascii.Error):
        raise InvalidRequest("raw_handle must be {\"b64\": <base64 CUDA IPC handle>}") from None
    await cuda.register(name, raw, body.get("device_id", 0), body.get("byte_size"))
    return {}


@router.post("/cudasharedmemory/unregister", summary="Unregister every CUDA region")
async def cuda_unregister_all(request: Request) -> dict:
    await _services(request).cuda_regions.unregister("")
    return {}


@router.post("/cudasharedmemory/region/{name}/unregister", summary="Unregister a CUDA region")
async def cuda_unregister(name: str, request: Request) -> dict:
    await _services(request).cuda_regions.unregister(name)
    return {}
