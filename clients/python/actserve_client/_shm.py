"""System shared memory for large tensors (``Client(..., shared_memory="auto")``).

Tensors of ``threshold`` bytes and more (1 MiB by default) go through POSIX shared-memory
regions the client creates (``/dev/shm``) and registers with the server (Triton's
``systemsharedmemory`` extension): the request names the region for the input and for the
output, and only a small JSON header travels over HTTP. Regions are reused: a call leases
one big enough for its input and output, and gives it back after reading the answer.

Whether the server can use them is checked, not assumed: the first large call registers a
probe region holding random values and asks the server for ``relu`` of them through it; only
if the answer in the region is exactly those values (they are positive) is shared memory
used, otherwise (another host, the extension off, any error) every call goes over HTTP.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

MODES = ("off", "auto")
DEFAULT_THRESHOLD = 1 << 20
ALIGN = 64


@dataclass
class Region:
    name: str  # the region's name on the server, and the key's base
    handle: shared_memory.SharedMemory
    size: int

    @property
    def key(self) -> str:
        return "/" + self.handle.name.lstrip("/")

    @property
    def buf(self) -> memoryview:
        return self.handle.buf


def out_offset(in_bytes: int) -> int:
    return (in_bytes + ALIGN - 1) // ALIGN * ALIGN


class RegionPool:
    """Regions this client created, leased one per call in flight. Thread-safe; no I/O
    with the server (the shells register and unregister)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._prefix = f"actserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._count = 0

    def take(self, nbytes: int) -> Region | None:
        """A registered region of at least ``nbytes`` that no call is using, or None."""
        with self._lock:
            for i, region in enumerate(self._free):
                if region.size >= nbytes:
                    return self._free.pop(i)
        return None

    def new(self, nbytes: int) -> Region:
        """A fresh region (a power of two, at least 1 MiB), to be registered, then
        ``adopt``-ed (or ``destroy``-ed when registering fails)."""
        with self._lock:
            self._count += 1
            name = f"{self._prefix}-{self._count}"
        size = max(DEFAULT_THRESHOLD, 1 << (nbytes - 1).bit_length())
        return Region(name, shared_memory.SharedMemory(name=name, create=True, size=size), size)

    def adopt(self, region: Region) -> None:
        with self._lock:
            self._all.append(region)

    def give_back(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def drain(self) -> list[Region]:
        """Every region, forgotten by the pool: unregister, then ``destroy`` each."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        return regions


def destroy(region: Region) -> None:
    try:
        region.handle.unlink()
    except FileNotFoundError:
        pass
    try:
        region.handle.close()
    except BufferError:  # a result view still points into it: unmapped when that goes
        pass


def write_input(region: Region, storage: np.ndarray) -> None:
    flat = np.ascontiguousarray(storage).reshape(-1).view(np.uint8)
    dst = np.frombuffer(region.buf, dtype=np.uint8, count=flat.nbytes)
    np.copyto(dst, flat)
    del dst  # no view of the mapping may outlive the call (it could not be closed)


def probe_values(count: int = 16) -> np.ndarray:
    """Random positive float32 values: relu gives them back unchanged."""
    rng = np.random.default_rng()
    return (rng.random(count, dtype=np.float32) + np.float32(0.5)).astype(np.float32)
