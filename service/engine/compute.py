"""Torch-side batch computation for one device. Runs only in that device's compute thread.

Batch invariance (docs/architecture.md, "Batch invariance, bit for bit"): a request's
result never depends on its batch.

* CPU: each request is applied alone, on a tensor of its own shape. CPU kernels split work
  into a vectorised body and a scalar tail, so concatenating requests could move an element
  from one to the other and change its last bit; batching on CPU buys only the shared
  thread hop, never a different answer.
* CUDA: requests of one wire dtype are packed into one pinned host staging buffer, each
  segment starting on a 64-element boundary (as aligned as a fresh allocation), copied to
  the device with one non-blocking H2D copy, converted, activated once on a dedicated
  stream, and copied back with one D2H copy into pinned memory. CUDA elementwise kernels
  compute each element independently, so the packed result equals the lone result.
  In the engine process, whose workers' arenas are registered as pinned memory, batches
  of large requests skip the host staging: each input is copied to its place on the
  device straight from its slot, and each answer straight into its answer slot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from service.engine.job import Job, JobResult
from service.engine.tensors import (  # noqa: F401 - compute is where most callers look
    NAMES,
    TORCH_DTYPES,
    apply_alone,
    autocast_dtype,
    tensor_storage,
    wire_tensor,
)
from service.errors import ComputeError

ALIGN = 64
STAGE_PARALLEL_BYTES = 4 << 20  # CUDA staging copies this large are split across threads
STAGE_PIECE = 1 << 20  # elements per staging copy task
STAGE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


def stage(staging: np.ndarray, jobs: Sequence[Job], offsets: Sequence[int],
          pool: ThreadPoolExecutor | None) -> None:
    """Copy each job's array into ``staging`` at its offset. Large batches are copied in
    pieces by ``pool``'s threads (numpy releases the GIL while it copies): one thread
    copying into pinned memory was the slowest step of a large GPU batch."""
    pieces = []
    for job, off in zip(jobs, offsets, strict=True):
        src = job.array.reshape(-1)
        for start in range(0, src.size, STAGE_PIECE):
            end = min(start + STAGE_PIECE, src.size)
            pieces.append((off + start, src[start:end]))
    if pool is None or staging.nbytes < STAGE_PARALLEL_BYTES or len(pieces) < 2:
        for at, src in pieces:
            staging[at:at + src.size] = src
        return

    def copy(piece) -> None:
        at, src = piece
        staging[at:at + src.size] = src

    for _ in pool.map(copy, pieces):
        pass


class FaultInjected(RuntimeError):
    """Raised for a request that asked for an injected compute fault (tests only)."""


class KillThread(BaseException):
    """Escapes every handler: the compute thread dies (tests only)."""


SLOT_MIN_BYTES = 256 << 10  # smaller inputs are cheaper staged: one copy call for them all


def _from_slots(jobs: Sequence[Job]) -> bool:
    """Whether a CUDA batch can go by DMA straight from and to its slots: every job has
    room lent for its answer, its input and that room are pinned (a registered arena), and
    the inputs are large enough for a copy call each to cost less than staging them."""
    if any(job.out is None for job in jobs):
        return False
    if sum(job.array.nbytes for job in jobs) < SLOT_MIN_BYTES * len(jobs):
        return False
    return all(torch.from_numpy(job.array).is_pinned() and torch.from_numpy(job.out).is_pinned()
               for job in jobs)


def _deliver(job: Job, result: JobResult) -> JobResult | ComputeError:
    """Copy the answer into the room its caller lent (``job.out``, bytes) and point the
    result at it, here in the compute thread, so nobody copies it on an event loop. A
    gradient goes at the end of that room (``RemoteEngine`` reserves it there)."""
    room = job.out
    if np.may_share_memory(result.array, room):
        return result  # the answer was written into its room (``_run_cuda_slots``)
    if result.grad is not None:
        grad = np.ascontiguousarray(result.grad)
        at = room.nbytes - grad.nbytes
        if at < 0:
            return ComputeError(f"the gradient ({grad.nbytes} bytes) is larger than the "
                                f"{room.nbytes} bytes reserved for the answer")
        room[at:] = grad.reshape(-1).view(np.uint8)
        result.grad = room[at:].view(grad.dtype).reshape(result.grad.shape)
        room = room[:at]
    shape = result.array.shape
    src = np.ascontiguousarray(result.array)  # (1-d for a 0-d array: shape kept above)
    if src.nbytes > room.nbytes:
        return ComputeError(f"the answer ({src.nbytes} bytes) is larger than the "
                            f"{room.nbytes} bytes reserved for it")
    dst = room[:src.nbytes]
    dst[:] = src.reshape(-1).view(np.uint8)
    result.array = dst.view(src.dtype).reshape(shape)
    return result


class DeviceCompute:
    """Computes batches of compatible jobs on one device."""

    def __init__(self, device: torch.device, fault_injection: bool = False) -> None:
        self.device = device
        self.fault_injection = fault_injection
        self.is_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.is_cuda else None
        self.stagers = (ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="actserve-stage")
                        if self.is_cuda and STAGE_THREADS > 1 else None)
        self.slot_batches = 0  # CUDA batches copied straight from and to pinned slots

    # -- public -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the staging threads (when the compute thread ends or is replaced)."""
        if self.stagers is not None:
            self.stagers.shutdown(wait=False)

    def run(self, jobs: Sequence[Job]) -> list[JobResult | Exception]:
        """Results in job order; a batch that fails is split so only a job that fails
        alone gets a ``ComputeError``."""
        elements = sum(j.numel for j in jobs)
        results = self._isolate(list(jobs))
        for i, (job, r) in enumerate(zip(jobs, results, strict=True)):
            if isinstance(r, JobResult):
                r.batch_requests = len(jobs)
                r.batch_elements = elements
                if job.out is not None:
                    results[i] = _deliver(job, r)
        return results

    # -- internals --------------------------------------------------------------------
    def _isolate(self, jobs: list[Job]) -> list[JobResult | Exception]:
        try:
            return self._run(jobs)
        except KillThread:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below
            if len(jobs) == 1:
                return [ComputeError(f"compute failed: {type(exc).__name__}: {exc}"[:300])]
            mid = len(jobs) // 2
            if self.is_cuda:
                torch.cuda.empty_cache()
            return self._isolate(jobs[:mid]) + self._isolate(jobs[mid:])

    def _check_faults(self, jobs: Sequence[Job]) -> None:
        if not self.fault_injection:
            return
        for j in jobs:
            if j.fault == "kill":
                raise KillThread()
            if j.fault == "compute":
                raise FaultInjected(f"injected compute fault for request {j.request_id}")
            if j.fault == "torch_warning":  # a real warning from torch's own code
                with torch.autocast("cpu", dtype=torch.float64):
                    pass

    def _run(self, jobs: list[Job]) -> list[JobResult | Exception]:
        self._check_faults(jobs)
        if any(j.alone for j in jobs):
            return self._run_alone(jobs)
        if self.is_cuda:
            return self._run_cuda(jobs)
        return self._run_cpu(jobs)

    def _run_alone(self, jobs: list[Job]) -> list[JobResult | Exception]:
        """Jobs asking for a gradient or a report, and layers that do not pack (batch
        norm), are computed one by one (``lab.py``); the rest of the batch as usual."""
        from service.engine import lab  # the lab's modules load on first use

        out: list[JobResult | Exception] = [None] * len(jobs)  # type: ignore[list-item]
        plain = [i for i, j in enumerate(jobs) if not j.alone]
        if plain:
            for i, r in zip(plain, self._run([jobs[i] for i in plain]), strict=True):
                out[i] = r
        for i, job in enumerate(jobs):
            if job.device_in is not None or job.device_out is not None:
                from service.engine import device_io  # CUDA shared memory (device_refs.py)

                out[i] = device_io.compute(job)
            elif job.alone:
                out[i] = lab.compute(job, self.device)
        return out

    def _run_cpu(self, jobs: list[Job]) -> list[JobResult | Exception]:
        out: list[JobResult | Exception] = []
        for job in jobs:
            t0 = time.perf_counter()
            y = apply_alone(job, wire_tensor(job.array, job.wire_dtype))
            arr = tensor_storage(y.contiguous())
            out.append(JobResult(arr, NAMES[y.dtype], time.perf_counter() - t0, 0, 0, "cpu"))
        return out

    def _run_cuda(self, jobs: list[Job]) -> list[JobResult | Exception]:
        results: dict[int, JobResult] = {}
        by_wire: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_wire.setdefault(job.wire_dtype, []).append(i)
        for wire, idx in by_wire.items():
            group = [jobs[i] for i in idx]
            for i, r in zip(idx, self._run_cuda_group(group, wire), strict=True):
                results[i] = r
        return [results[i] for i in range(len(jobs))]

    def _run_cuda_group(self, jobs: list[Job], wire: str) -> list[JobResult]:
        offsets, total = [], 0
        for job in jobs:
            offsets.append(total)
            total += -(-job.numel // ALIGN) * ALIGN
        if _from_slots(jobs):
            return self._run_cuda_slots(jobs, wire, offsets, total)
        host_in = torch.empty(total, dtype=TORCH_DTYPES[wire], pin_memory=True)
        stage(tensor_storage(host_in), jobs, offsets, self.stagers)
        first = jobs[0]
        timing = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.cuda.stream(self.stream):
            timing[0].record(self.stream)
            dev = host_in.to(self.device, non_blocking=True)
            timing[1].record(self.stream)
            y = apply_alone(first, dev)
            timing[2].record(self.stream)
            host_out = torch.empty(y.numel(), dtype=y.dtype, pin_memory=True)
            host_out.copy_(y, non_blocking=True)
            timing[3].record(self.stream)
        timing[3].synchronize()
        flat = tensor_storage(host_out)
        return self._timed([flat[off:off + job.numel].reshape(job.array.shape)
                            for job, off in zip(jobs, offsets, strict=True)], y.dtype, timing)

    def _run_cuda_slots(self, jobs: list[Job], wire: str, offsets: list[int],
                        total: int) -> list[JobResult]:
        """The engine process with its workers' arenas registered as pinned memory
        (``ipc/pinning.py``): each input is copied to the device straight from its slot and
        each answer straight into the slot its worker reserved, by DMA, with no staging copy
        on the host. The packing on the device is the same as the staged path's."""
        timing = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.cuda.stream(self.stream):
            dev = torch.empty(total, dtype=TORCH_DTYPES[wire], device=self.device)
            timing[0].record(self.stream)
            for job, off in zip(jobs, offsets, strict=True):
                dev[off:off + job.numel].copy_(
                    wire_tensor(job.array, wire).reshape(-1), non_blocking=True)
            timing[1].record(self.stream)
            y = apply_alone(jobs[0], dev)
            timing[2].record(self.stream)
            size = y.element_size()
            if any(job.numel * size > job.out.nbytes for job in jobs):
                raise ComputeError("an answer is larger than the room reserved for it")
            rooms = [job.out[:job.numel * size] for job in jobs]
            for room, job, off in zip(rooms, jobs, offsets, strict=True):
                torch.from_numpy(room).view(y.dtype).copy_(y[off:off + job.numel],
                                                           non_blocking=True)
            timing[3].record(self.stream)
        timing[3].synchronize()
        self.slot_batches += 1
        storage = tensor_storage(torch.empty(0, dtype=y.dtype)).dtype
        return self._timed([room.view(storage).reshape(job.array.shape)
                            for room, job in zip(rooms, jobs, strict=True)], y.dtype, timing)

    def _timed(self, arrays: list[np.ndarray], dtype: torch.dtype,
               timing: list) -> list[JobResult]:
        """Results carrying the batch's event-timed phases: H2D, compute, D2H."""
        compute_s = timing[1].elapsed_time(timing[2]) / 1000.0
        phases = {
            "h2d": timing[0].elapsed_time(timing[1]) / 1000.0,
            "d2h": timing[2].elapsed_time(timing[3]) / 1000.0,
        }
        return [JobResult(a, NAMES[dtype], compute_s, 0, 0, str(self.device), extra=dict(phases))
                for a in arrays]
