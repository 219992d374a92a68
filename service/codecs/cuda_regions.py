"""CUDA shared-memory regions (Triton's ``cudasharedmemory`` extension): the bookkeeping
behind the endpoints and the checks of the requests that name a region. Torch-free.

A co-located client allocates device memory, exports a CUDA IPC handle for it
(``cudaIpcGetMemHandle``: 64 bytes) and registers it under a name with its device and
size; it then names the region in a v2 request (the same ``shared_memory_region`` /
``_byte_size`` / ``_offset`` parameters as system shared memory; which registry knows the
name decides) and the tensor never passes through host memory.

* Validation is here: names like system regions, ``device_id`` one of the server's CUDA
  devices, ``byte_size`` > 0, a 64-byte handle, at most ``MAX_REGIONS`` regions;
  ``enabled=False`` refuses every call (``ACTSERVE_SHARED_MEMORY=false``).
* Opening the handle is the engine's (``opener``/``closer``: ``Engine.open_cuda_region``,
  or ``RemoteEngine``'s, which asks the engine process): it runs in a compute thread of the
  region's device, eagerly, so a bad handle is a 400 at registration, as in Triton.
* A server with no CUDA device answers every call with a clear 400 (unless fault injection
  is on, for the test-only emulated handle of ``service.engine.device_refs``).

Every method runs on the event loop: no locks. Status entries have Triton's fields
(``name``, ``device_id``, ``byte_size``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.codecs.shm_regions import MAX_REGIONS, RegionNotFound, check_int, check_name
from service.engine.device_refs import IPC_HANDLE_BYTES, DeviceRef, is_emulated
from service.errors import InvalidRequest, echo

OFF = ("CUDA shared memory is turned off on this server (ACTSERVE_SHARED_MEMORY=false); "
       "send the tensor in the request")
Opener = Callable[[str, bytes, int, int], Awaitable[None]]
Closer = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    owner: str | None = None  # the API key (digest) that registered it; None without keys

    def status(self) -> dict:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


class CudaRegions:
    def __init__(self, devices: list[str], enabled: bool = True, *,
                 opener: Opener | None = None, closer: Closer | None = None,
                 emulate: bool = False) -> None:
        self.devices = devices
        self.enabled = enabled
        self.cuda_ids = [int(d.split(":", 1)[1]) for d in devices if d.startswith("cuda:")]
        self.opener = opener
        self.closer = closer
        self.emulate = emulate  # fault injection: the test-only emulated handle
        self._regions: dict[str, CudaRegion] = {}
        self._opening: set[str] = set()

    @property
    def available(self) -> bool:
        return bool(self.cuda_ids) or self.emulate

    def refuse(self) -> None:
        """The 400 of a server that cannot serve the extension (no CUDA device, or off)."""
        if not self.available:
            raise InvalidRequest(
                "CUDA shared memory is not available: this server has no CUDA device "
                f"(devices: {', '.join(self.devices)}); use system shared memory "
                "(/v2/systemsharedmemory) or send the tensor in the request"
            )
        if not self.enabled:
            raise InvalidRequest(OFF)

    def scoped(self, owner: str | None) -> CudaRegions | ScopedCudaRegions:
        """The regions as ``owner`` sees them (itself when ``owner`` is None): with API
        keys on, a key sees, uses and removes only the regions it registered."""
        return self if owner is None else ScopedCudaRegions(self, owner)

    # -- management -------------------------------------------------------------------------
    def status(self, name: object = "", owner: str | None = None) -> list[dict]:
        self.refuse()
        if not name:
            return [r.status() for r in self._regions.values() if r.owner == owner]
        return [self._get(check_name(name), owner).status()]

    async def register(self, name: object, raw_handle: object, device_id: object,
                       byte_size: object, owner: str | None = None) -> None:
        self.refuse()
        name = check_name(name)
        if not isinstance(raw_handle, bytes) or len(raw_handle) != IPC_HANDLE_BYTES:
            size = len(raw_handle) if isinstance(raw_handle, bytes) else echo(raw_handle)
            raise InvalidRequest(f"CUDA shared memory region {name!r}: raw_handle must be a "
                                 f"{IPC_HANDLE_BYTES}-byte CUDA IPC handle "
                                 f"(cudaIpcMemHandle_t), got {size} bytes")
        device_id = check_int(device_id, "device_id", 0)
        emulated = self.emulate and is_emulated(raw_handle)
        if device_id not in self.cuda_ids and not (emulated and device_id == 0):
            ids = ", ".join(map(str, self.cuda_ids)) or "none"
            raise InvalidRequest(f"CUDA shared memory region {name!r}: device_id {device_id} "
                                 f"is not one of this server's CUDA devices ({ids})")
        byte_size = check_int(byte_size, "byte_size", 1)
        key = _key(owner, name)
        if key in self._regions or key in self._opening:
            raise InvalidRequest(f"CUDA shared memory region {name!r} is already registered; "
                                 "unregister it first")
        if sum(1 for r in self._regions.values() if r.owner == owner) + len(self._opening) \
                >= MAX_REGIONS:
            raise InvalidRequest(f"at most {MAX_REGIONS} CUDA shared memory regions may be "
                                 "registered")
        self._opening.add(key)
        try:
            if self.opener is not None:
                await self.opener(key, raw_handle, device_id, byte_size)
            self._regions[key] = CudaRegion(name, device_id, byte_size, owner)
        finally:
            self._opening.discard(key)

    async def unregister(self, name: object = "", owner: str | None = None) -> None:
        """One region, or every region of ``owner`` when ``name`` is empty."""
        self.refuse()
        if not name:
            keys = [k for k, r in self._regions.items() if r.owner == owner]
        else:
            self._get(check_name(name), owner)
            keys = [_key(owner, name)]
        for k in keys:
            self._regions.pop(k, None)
            if self.closer is not None:
                await self.closer(k)

    def close(self) -> None:
        """Forget every region (shutdown; the engine closes its handles when it stops)."""
        self._regions.clear()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._regions

    # -- use --------------------------------------------------------------------------------
    def ref(self, name: str, offset: object, size: int, where: str,
            owner: str | None = None) -> DeviceRef:
        """The window of a region named for an input or output, checked against the
        registered size (the engine checks it again when it computes). The reference names
        the region as the engine knows it (the owner's namespace)."""
        self.refuse()
        key = _key(owner, name) if isinstance(name, str) else name
        region = self._regions.get(key)
        if region is None:
            raise InvalidRequest(f"{where}: CUDA shared memory region {echo(name)} is not "
                                 "registered")
        offset = check_int(offset, f"{where}: shared_memory_offset", 0)
        if offset + size > region.byte_size:
            raise InvalidRequest(
                f"{where}: {size} bytes at offset {offset} do not fit in CUDA shared memory "
                f"region {name!r} of {region.byte_size} bytes"
            )
        return DeviceRef(key, offset, size)

    def _get(self, name: str, owner: str | None = None) -> CudaRegion:
        region = self._regions.get(_key(owner, name))
        if region is None:
            raise RegionNotFound(f"no CUDA shared memory region named {name!r} is registered")
        return region


def _key(owner: str | None, name: str) -> str:
    """A region's name as the engine knows it: the owner's namespace, then the name (names
    never hold '/', so two keys' regions of one name never meet)."""
    return name if owner is None else f"{owner}/{name}"


class ScopedCudaRegions:
    """``CudaRegions`` as one API key sees them (``CudaRegions.scoped``)."""

    def __init__(self, regions: CudaRegions, owner: str) -> None:
        self._regions_of = regions
        self.owner = owner

    def __getattr__(self, attr: str):  # devices, cuda_ids, enabled, available, refuse, ...
        return getattr(self._regions_of, attr)

    def status(self, name: object = "") -> list[dict]:
        return self._regions_of.status(name, self.owner)

    async def register(self, name: object, raw_handle: object, device_id: object,
                       byte_size: object) -> None:
        await self._regions_of.register(name, raw_handle, device_id, byte_size, self.owner)

    async def unregister(self, name: object = "") -> None:
        await self._regions_of.unregister(name, self.owner)

    def ref(self, name: str, offset: object, size: int, where: str) -> DeviceRef:
        return self._regions_of.ref(name, offset, size, where, self.owner)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(self.owner, name) in self._regions_of
