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

    # -- management -------------------------------------------------------------------------
    def status(self, name: object = "") -> list[dict]:
        self.refuse()
        if not name:
            return [r.status() for r in self._regions.values()]
        return [self._get(check_name(name)).status()]

    async def register(self, name: object, raw_handle: object, device_id: object,
                       byte_size: object) -> None:
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
        if name in self._regions or name in self._opening:
            raise InvalidRequest(f"CUDA shared memory region {name!r} is already registered; "
                                 "unregister it first")
        if len(self._regions) + len(self._opening) >= MAX_REGIONS:
            raise InvalidRequest(f"at most {MAX_REGIONS} CUDA shared memory regions may be "
                                 "registered")
        self._opening.add(name)
        try:
            if self.opener is not None:
                await self.opener(name, raw_handle, device_id, byte_size)
            self._regions[name] = CudaRegion(name, device_id, byte_size)
        finally:
            self._opening.discard(name)

    async def unregister(self, name: object = "") -> None:
        """One region, or every region when ``name`` is empty."""
        self.refuse()
        names = list(self._regions) if not name else [self._get(check_name(name)).name]
        for n in names:
            self._regions.pop(n, None)
            if self.closer is not None:
                await self.closer(n)

    def close(self) -> None:
        """Forget every region (shutdown; the engine closes its handles when it stops)."""
        self._regions.clear()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._regions

    # -- use --------------------------------------------------------------------------------
    def ref(self, name: str, offset: object, size: int, where: str) -> DeviceRef:
        """The window of a region named for an input or output, checked against the
        registered size (the engine checks it again when it computes)."""
        self.refuse()
        region = self._regions.get(name)
        if region is None:
            raise InvalidRequest(f"{where}: CUDA shared memory region {echo(name)} is not "
                                 "registered")
        offset = check_int(offset, f"{where}: shared_memory_offset", 0)
        if offset + size > region.byte_size:
            raise InvalidRequest(
                f"{where}: {size} bytes at offset {offset} do not fit in CUDA shared memory "
                f"region {name!r} of {region.byte_size} bytes"
            )
        return DeviceRef(name, offset, size)

    def _get(self, name: str) -> CudaRegion:
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"no CUDA shared memory region named {name!r} is registered")
        return region
