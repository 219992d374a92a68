"""Triton's shared-memory extensions over HTTP: ``/v2/systemsharedmemory`` and
``/v2/cudasharedmemory`` (status, register, unregister; all regions or one). The regions
live in ``Services.regions`` / ``Services.cuda_regions``, shared with gRPC. Errors are v2
bodies (``{"error": ...}``); with API keys configured every call needs a key (middleware),
and a system region belongs to the key that registered it (``regions``). Every POST refuses
the content types a browser sends cross-site without a preflight (415), before anything
else: a web page cannot register or unregister regions of a key-less local server.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, Request

from service.codecs.fields import refuse_simple_type
from service.codecs.jsonio import loads_object
from service.codecs.shm_regions import owner_of
from service.errors import InvalidRequest
from service.http.body import declared_size, read_body


async def _no_simple_type(request: Request) -> None:  # async: runs on the loop, no thread hop
    refuse_simple_type(request.headers.get("content-type"))


router = APIRouter(prefix="/v2", tags=["v2 shared memory"])
# every POST: a browser-simple Content-Type is a 415 before anything else runs
posts = APIRouter(dependencies=[Depends(_no_simple_type)])
MAX_BODY = 64 * 1024


def _services(request: Request):
    return request.app.state.services


def owner(request: Request) -> str | None:
    """Who the caller is for shared-memory regions: its API key (a digest of it) when keys
    are on (the middleware has checked it), else None (one namespace)."""
    if not request.app.state.services.settings.api_key_list:
        return None
    _, _, token = request.headers.get("authorization", "").partition(" ")
    return owner_of(token)


def regions(request: Request):
    """The system regions as this caller sees them."""
    return _services(request).regions.scoped(owner(request))


def cuda_regions(request: Request):
    """The CUDA regions as this caller sees them (its own, with API keys on)."""
    return _services(request).cuda_regions.scoped(owner(request))


def caller_regions(request: Request):
    """(system regions, CUDA regions) as this caller sees them, its owner worked out once
    (an inference request names either)."""
    svc = request.app.state.services
    if not svc.settings.api_keys:  # no keys: one namespace (every inference request)
        return svc.regions, svc.cuda_regions
    who = owner(request)
    return svc.regions.scoped(who), svc.cuda_regions.scoped(who)


async def _json(request: Request) -> dict:
    """The small JSON body of a register call, read within ``MAX_BODY`` (413 beyond)."""
    size = declared_size(request, MAX_BODY)
    timeout = request.app.state.services.settings.body_timeout_s
    body, _ = await read_body(request, size, MAX_BODY, timeout)
    return loads_object(body) if body else {}


# -- system shared memory ------------------------------------------------------------------
@router.get("/systemsharedmemory/status", summary="Every system shared-memory region")
async def system_status(request: Request) -> list:
    return regions(request).status()


@router.get("/systemsharedmemory/region/{name}/status", summary="One system shared-memory region")
async def system_region_status(name: str, request: Request) -> list:
    return regions(request).status(name)


@posts.post("/systemsharedmemory/region/{name}/register", summary="Register a region")
async def system_register(name: str, request: Request) -> dict:
    mine = regions(request)
    mine.check_enabled()  # refused before the body is read
    body = await _json(request)
    mine.register(name, body.get("key"), body.get("offset", 0), body.get("byte_size"))
    return {}


@posts.post("/systemsharedmemory/unregister", summary="Unregister every region (of the caller)")
async def system_unregister_all(request: Request) -> dict:
    regions(request).unregister("")
    return {}


@posts.post("/systemsharedmemory/region/{name}/unregister", summary="Unregister a region")
async def system_unregister(name: str, request: Request) -> dict:
    regions(request).unregister(name)
    return {}


# -- CUDA shared memory --------------------------------------------------------------------
@router.get("/cudasharedmemory/status", summary="Every CUDA shared-memory region")
async def cuda_status(request: Request) -> list:
    return cuda_regions(request).status()


@router.get("/cudasharedmemory/region/{name}/status", summary="One CUDA shared-memory region")
async def cuda_region_status(name: str, request: Request) -> list:
    return cuda_regions(request).status(name)


@posts.post("/cudasharedmemory/region/{name}/register", summary="Register a CUDA region")
async def cuda_register(name: str, request: Request) -> dict:
    cuda = cuda_regions(request)
    cuda.refuse()  # refused before the body is read (no CUDA device, or turned off)
    body = await _json(request)
    handle = body.get("raw_handle")
    try:
        raw = base64.b64decode(handle["b64"], validate=True)
    except (TypeError, KeyError, binascii.Error):
        raise InvalidRequest("raw_handle must be {\"b64\": <base64 CUDA IPC handle>}") from None
    await cuda.register(name, raw, body.get("device_id", 0), body.get("byte_size"))
    return {}


@posts.post("/cudasharedmemory/unregister", summary="Unregister every CUDA region")
async def cuda_unregister_all(request: Request) -> dict:
    await cuda_regions(request).unregister("")
    return {}


@posts.post("/cudasharedmemory/region/{name}/unregister", summary="Unregister a CUDA region")
async def cuda_unregister(name: str, request: Request) -> dict:
    await cuda_regions(request).unregister(name)
    return {}


router.include_router(posts)  # under /v2 like the rest
