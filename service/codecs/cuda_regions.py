"""CUDA shared-memory regions (Triton's ``cudasharedmemory`` extension): the endpoints'
answers. Torch-free.

A CPU-only server answers every call with a clear 400. Opening CUDA IPC handles and feeding
device tensors to the engine without host copies is not implemented yet: a CUDA server
answers the same way, naming system shared memory as the way to pass large tensors.
"""

from __future__ import annotations

from service.errors import InvalidRequest


class CudaRegions:
    def __init__(self, devices: list[str]) -> None:
        self.devices = devices

    @property
    def available(self) -> bool:
        return False

    def refuse(self) -> None:
        if not any(d.startswith("cuda") for d in self.devices):
            raise InvalidRequest(
                "CUDA shared memory is not available: this server has no CUDA device "
                f"(devices: {', '.join(self.devices)}); use system shared memory "
                "(/v2/systemsharedmemory) or send the tensor in the request"
            )
        raise InvalidRequest(
            "CUDA shared memory (CUDA IPC handles) is not supported by this server yet; use "
            "system shared memory (/v2/systemsharedmemory) or send the tensor in the request"
        )

    def status(self, name: str = "") -> list[dict]:
        self.refuse()
        return []

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.refuse()

    def unregister(self, name: str = "") -> None:
        self.refuse()
