"""A request whose input and/or answer live in CUDA shared-memory regions (device_refs.py),
computed by itself in the compute thread on the region's device: the input is a view of
the region (cloned first when ``inplace``, so the client's tensor is never modified), the
activation is ``apply_alone`` (bit for bit the lone reference), and the answer is copied
device to device into the output region, or device to host into the normal answer. The
stream is synchronized before the result is handed back.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from service import dtypes
from service.engine.device_refs import DeviceRef, placeholder
from service.engine.job import Job, JobResult
from service.engine.tensors import NAMES, TORCH_DTYPES, apply_alone, tensor_storage, wire_tensor
from service.errors import ActserveError, ComputeError, InvalidRequest


def _window(ref: DeviceRef, nbytes: int, where: str) -> torch.Tensor:
    """``nbytes`` bytes of the region from the ref's offset, bounds-checked now."""
    region = ref.opened
    size = region.tensor.numel()
    if ref.offset + nbytes > size:
        raise InvalidRequest(f"{where}: {nbytes} bytes at offset {ref.offset} do not fit in "
                             f"CUDA shared memory region {ref.region!r} of {size} bytes")
    return region.tensor[ref.offset:ref.offset + nbytes]


def _input(job: Job, device: torch.device) -> torch.Tensor:
    if job.device_in is None:
        return wire_tensor(np.ascontiguousarray(job.array), job.wire_dtype).to(device)
    where = "input 'input'"
    itemsize = dtypes.itemsize(job.wire_dtype)
    if job.device_in.offset % itemsize:
        raise InvalidRequest(f"{where}: shared_memory_offset {job.device_in.offset} is not a "
                             f"multiple of the {itemsize}-byte element size")
    raw = _window(job.device_in, job.numel * itemsize, where)
    x = raw.view(TORCH_DTYPES[job.wire_dtype]).reshape(job.array.shape)
    return x.clone() if job.mode.inplace else x


def _output(job: Job, y: torch.Tensor) -> np.ndarray:
    ref = job.device_out
    if ref is None:
        return tensor_storage(y.cpu().contiguous())
    where = "output 'output'"
    nbytes = y.numel() * y.element_size()
    if nbytes > ref.nbytes:
        raise InvalidRequest(f"{where} needs {nbytes} bytes but its shared_memory_byte_size "
                             f"is {ref.nbytes}")
    _window(ref, nbytes, where).copy_(y.contiguous().reshape(-1).view(torch.uint8))
    return placeholder(dtypes.STORAGE[NAMES[y.dtype]], tuple(y.shape))


def compute(job: Job) -> JobResult | Exception:
    refs = [r for r in (job.device_in, job.device_out) if r is not None]
    device = refs[0].opened.device
    held = []
    try:
        for ref in refs:
            ref.opened.acquire(f"region {ref.region!r}")
            held.append(ref.opened)
        t0 = time.perf_counter()
        with torch.cuda.device(device) if device.type == "cuda" \
                else contextlib.nullcontext():
            y = apply_alone(job, _input(job, device))
            array = _output(job, y)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        return JobResult(array, NAMES[y.dtype], time.perf_counter() - t0, 0, 0, str(device))
    except ActserveError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a CUDA failure answers this request alone
        names = ", ".join(repr(r.region) for r in refs)
        return ComputeError(f"compute on CUDA shared memory region {names} failed: "
                            f"{type(exc).__name__}: {exc}"[:300])
    finally:
        for region in held:
            region.release()

