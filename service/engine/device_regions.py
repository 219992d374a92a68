"""The CUDA shared-memory regions an engine has opened (cuda_ipc.py), by key, and the
loop side of opening and closing them: every CUDA call runs in a compute thread of the
region's device (``Executor.call``), never on the event loop.

Inline, a key is the region's name; the engine process keys each worker's regions by that
worker (``host.py``), so two workers may use the same name. A job's ``DeviceRef`` is
pointed at its opened region on submit (``attach``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from service.engine.device_refs import is_emulated
from service.errors import InvalidRequest, NotReady

if TYPE_CHECKING:
    from service.engine.cuda_ipc import OpenedRegion
    from service.engine.engine import Engine
    from service.engine.job import Job


class DeviceRegionsHost:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._regions: dict[str, OpenedRegion] = {}

    def _running(self, device: str):
        """The live compute thread of ``device``, or None."""
        return next((ex for ex in self.engine.pool.executors
                     if ex.alive and ex.device == device), None)

    def _executor(self, device: str):
        ex = self._running(device) or next(
            (ex for ex in self.engine.pool.executors if ex.alive), None)
        if ex is None:
            raise NotReady("no compute executor is running to open the CUDA handle; retry")
        return ex

    async def open(self, key: str, raw: bytes, device_id: int, byte_size: int) -> None:
        """Open the handle in a compute thread of ``cuda:<device_id>``; a 400 naming the
        region if it cannot be opened (the thread goes on serving)."""
        from service.engine import cuda_ipc  # torch-side; loaded on first use

        if key in self._regions:
            raise InvalidRequest(f"CUDA shared memory region {key!r} is already registered; "
                                 "unregister it first")
        emulate = self.engine.settings.fault_injection and is_emulated(raw)
        device = "cpu" if emulate else f"cuda:{device_id}"
        if not emulate and device not in self.engine.devices:
            raise InvalidRequest(f"CUDA shared memory: device_id {device_id} is not one of "
                                 f"this server's devices ({', '.join(self.engine.devices)})")
        ex = self._executor(device)
        name = key.rsplit("/", 1)[-1]
        region = await asyncio.wrap_future(ex.call(
            lambda c: cuda_ipc.open_region(name, raw, _torch_device(device), byte_size,
                                           emulate)))
        if key in self._regions:  # registered meanwhile: keep the first
            await self._retire(region)
            raise InvalidRequest(f"CUDA shared memory region {key!r} is already registered")
        self._regions[key] = region

    async def close(self, key: str) -> None:
        region = self._regions.pop(key, None)
        if region is not None:  # else never opened here (a restarted engine): nothing to do
            await self._retire(region)

    async def close_prefix(self, prefix: str) -> None:
        for key in [k for k in self._regions if k.startswith(prefix)]:
            await self._retire(self._regions.pop(key))

    async def close_all(self) -> None:
        await self.close_prefix("")

    async def _retire(self, region: OpenedRegion) -> None:
        """Closed in a compute thread of its device (or a plain thread when none runs);
        a job still using it closes it when it is done."""
        ex = self._running(str(region.device))
        if ex is None:
            await asyncio.to_thread(region.retire)
        else:
            await asyncio.wrap_future(ex.call(lambda c: region.retire()))

    def attach(self, job: Job) -> None:
        """Point the job's refs at their opened regions (a 400 when unknown), one device."""
        device = None
        for ref in (job.device_in, job.device_out):
            if ref is None:
                continue
            region = self._regions.get(ref.lookup)
            if region is None:
                raise InvalidRequest(f"CUDA shared memory region {ref.region!r} is not "
                                     "registered with the engine")
            if device is not None and region.device != device:
                raise InvalidRequest("the input and output CUDA shared memory regions must "
                                     f"be on the same device ({device} and {region.device})")
            device = region.device
            ref.opened = region


def _torch_device(device: str):
    import torch

    return torch.device(device)
