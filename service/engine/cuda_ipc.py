"""Opening a client's CUDA IPC memory handle (Triton's ``cudasharedmemory`` extension) as a
torch tensor on the device, without a copy. Runs only in a compute thread (never on the
event loop); the engine keeps what it opened (``device_regions.py``).

``open_region`` makes the device current, calls ``cudaIpcOpenMemHandle`` (with
``cudaIpcMemLazyEnablePeerAccess``) from the CUDA runtime torch loaded, and wraps the
pointer as a ``uint8`` CUDA tensor through ``__cuda_array_interface__``; ``close`` calls
``cudaIpcCloseMemHandle``. Every failure is an ``InvalidRequest`` naming the region: a bad
handle never kills the compute thread. These ctypes calls are exercised only on a GPU
(tests/test_gpu_cuda_shm.py); the test-only emulated handle (``device_refs``) maps a
/dev/shm object instead, so the rest of the path is tested without one.

A region in use by a computing job is closed only when that job is done (``acquire`` /
``release``): an unregister while a request is in flight never frees memory under a kernel;
a job that starts after it gets a 400.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import threading

import torch

from service.engine.device_refs import IPC_HANDLE_BYTES, emulated_key, is_emulated
from service.errors import InvalidRequest

LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


def _handle(raw: bytes) -> _Handle:
    """The struct, byte for byte (NUL bytes included), passed by value."""
    handle = _Handle()
    ctypes.memmove(ctypes.addressof(handle), raw, IPC_HANDLE_BYTES)
    return handle


_runtime: ctypes.CDLL | None = None


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime library torch uses (its soname from ``torch.version.cuda``, else the
    copy in the nvidia/cuda_runtime wheel)."""
    global _runtime
    if _runtime is not None:
        return _runtime
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"libcudart.so.{major}", "libcudart.so"]
    try:
        import nvidia.cuda_runtime as wheel  # the wheel torch depends on, when installed

        for root in wheel.__path__:
            names += sorted(glob.glob(os.path.join(root, "lib", "libcudart.so*")))
    except ImportError:
        pass
    problems = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            problems.append(str(exc))
            continue
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _Handle,
                                             ctypes.c_uint]
        lib.cudaIpcOpenMemHandle.restype = ctypes.c_int
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaIpcCloseMemHandle.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetLastError.restype = ctypes.c_int
        _runtime = lib
        return lib
    raise InvalidRequest("CUDA shared memory: the CUDA runtime library could not be loaded "
                         f"({'; '.join(problems)[:200]})")


def _error(lib: ctypes.CDLL, code: int) -> str:
    text = lib.cudaGetErrorString(code)
    lib.cudaGetLastError()  # clear the sticky-free error so the next call starts clean
    return f"{text.decode() if text else 'unknown error'} (cudaError {code})"


class _Memory:
    """``__cuda_array_interface__`` of raw device bytes, for ``torch.as_tensor``."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "strides": None,
                                         "version": 2}


class OpenedRegion:
    """A client's region, opened in this process: ``tensor`` is its bytes (uint8)."""

    def __init__(self, name: str, device: torch.device, tensor: torch.Tensor, closer) -> None:
        self.name = name
        self.device = device
        self.tensor = tensor
        self._closer = closer
        self._lock = threading.Lock()
        self._users = 0
        self.retired = False
        self.closed = False

    def acquire(self, where: str) -> None:
        with self._lock:
            if self.retired:
                raise InvalidRequest(f"{where}: CUDA shared memory region {self.name!r} was "
                                     "unregistered while the request was in flight")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self.retired and self._users == 0
        if last:
            self._close()

    def retire(self) -> None:
        """Unregistered: closed now, or when the last job using it is done."""
        with self._lock:
            self.retired = True
            idle = self._users == 0
        if idle:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.tensor = None
        self._closer()


def open_region(name: str, raw: bytes, device: torch.device, byte_size: int,
                emulate: bool = False) -> OpenedRegion:
    """Open ``raw`` (a ``cudaIpcMemHandle_t``) on ``device``; a 400 naming ``name`` if the
    handle cannot be opened."""
    if len(raw) != IPC_HANDLE_BYTES:
        raise InvalidRequest(f"CUDA shared memory region {name!r}: raw_handle must be "
                             f"{IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    if emulate and is_emulated(raw):
        return _open_emulated(name, raw, byte_size)
    if device.type != "cuda":
        raise InvalidRequest(f"CUDA shared memory region {name!r}: device {device} is not a "
                             "CUDA device")
    lib = _cudart()
    ptr = ctypes.c_void_p()
    with torch.cuda.device(device):
        torch.cuda.init()
        code = lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), _handle(raw),
                                        LAZY_ENABLE_PEER_ACCESS)
        if code != 0:
            raise InvalidRequest(f"CUDA shared memory region {name!r}: cudaIpcOpenMemHandle "
                                 f"failed on {device}: {_error(lib, code)}")
        base = ptr.value

        def close() -> None:
            with torch.cuda.device(device):
                lib.cudaIpcCloseMemHandle(ctypes.c_void_p(base))

        try:
            tensor = torch.as_tensor(_Memory(base, byte_size), device=device)
        except Exception as exc:
            close()
            raise InvalidRequest(f"CUDA shared memory region {name!r}: the opened memory "
                                 f"cannot be used as a tensor: {exc}"[:300]) from None
    return OpenedRegion(name, device, tensor, close)


def _open_emulated(name: str, raw: bytes, byte_size: int) -> OpenedRegion:
    """Tests only: the /dev/shm object named in the stand-in handle, mapped."""
    key = emulated_key(raw)
    path = os.path.join("/dev/shm", key)
    if "/" in key or not key:
        raise InvalidRequest(f"CUDA shared memory region {name!r}: bad emulated handle")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidRequest(f"CUDA shared memory region {name!r}: cannot open the handle "
                             f"(emulated: {exc.strerror})") from None
    try:
        if os.fstat(fd).st_size < byte_size:
            raise InvalidRequest(f"CUDA shared memory region {name!r}: the memory behind the "
                                 f"handle is smaller than byte_size {byte_size}")
        mm = mmap.mmap(fd, byte_size)
    finally:
        os.close(fd)
    # host memory: the emulated region computes on the CPU, whatever the server's devices
    tensor = torch.frombuffer(mm, dtype=torch.uint8)
    return OpenedRegion(name, torch.device("cpu"), tensor, lambda: _unmap(mm))


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view is still alive somewhere: the collector unmaps it later
        pass

