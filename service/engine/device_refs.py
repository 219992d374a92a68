"""Tensors that live in a client's CUDA shared-memory region (Triton's ``cudasharedmemory``
extension, docs/v2-protocol.md): what a job carries instead of host bytes. Torch-free.

A ``DeviceRef`` names a window of a registered region. The engine that computes the job
attaches the opened region (``cuda_ipc.OpenedRegion``) to it on submit; the compute thread
reads the input from it, or writes the answer into it, without a host copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
# A test-only stand-in for a CUDA IPC handle, honoured only when the server's fault
# injection is on: this prefix, then the name of a /dev/shm object the engine maps as the
# region's memory (on the server's first device). It exercises every step of the path but
# the CUDA runtime calls, which only a GPU checks (tests/test_gpu_cuda_shm.py).
EMULATED_HANDLE = b"actserve-emulated-ipc:"


@dataclass(slots=True, eq=False)
class DeviceRef:
    region: str  # the region's name, as the client registered it
    offset: int  # bytes into the region
    nbytes: int  # the window's size (the input's bytes; room for the output)
    key: str = ""  # the engine's key for the region ('' : the name itself)
    opened: object = None  # the opened region, attached by the engine on submit

    @property
    def lookup(self) -> str:
        return self.key or self.region

    def wire(self) -> list:
        return [self.region, self.offset, self.nbytes]


def ref_from_wire(raw: list | None, prefix: str) -> DeviceRef | None:
    """A ``DeviceRef`` sent on the engine channel, keyed for the worker that sent it."""
    if raw is None:
        return None
    name, offset, nbytes = raw
    return DeviceRef(str(name), int(offset), int(nbytes), f"{prefix}{name}")


def placeholder(storage: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-stride stand-in for a tensor whose bytes stay on the device: its shape, size,
    dtype and nbytes are the tensor's, it holds one element."""
    return np.broadcast_to(np.zeros((), dtype=storage), shape)


def is_emulated(raw: bytes) -> bool:
    return raw.startswith(EMULATED_HANDLE)


def emulated_handle(key: str) -> bytes:
    """The stand-in handle for the /dev/shm object ``key`` (tests only)."""
    raw = EMULATED_HANDLE + key.lstrip("/").encode()
    if len(raw) > IPC_HANDLE_BYTES:
        raise ValueError("key too long for an emulated handle")
    return raw.ljust(IPC_HANDLE_BYTES, b"\0")


def emulated_key(raw: bytes) -> str:
    return raw[len(EMULATED_HANDLE):].rstrip(b"\0").decode("ascii", "replace")
