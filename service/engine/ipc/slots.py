"""Where a job's tensors lie in a worker's shared-memory arena (docs/engine.md): how much
room it needs, its input copied into a slot or adopted where its body was read
(``lending.py``), the answer (and gradient) read from its answer slot, and the slots given
back. The layout is the engine's (``host.py``): the upstream gradient follows the input on
a slot boundary; the gradient sits at the end of the answer's slot."""

from __future__ import annotations

import numpy as np

from service import dtypes
from service.engine.ipc.arena import ALIGN, Arena, ArenaFull
from service.engine.ipc.lending import Lender, LentBody
from service.engine.ipc.pending import Pending
from service.engine.job import Job
from service.errors import RequestTooLarge


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def answer_itemsize(job: Job) -> int:
    """Bytes per element the answer may need: its dtype is the compute dtype, or with
    autocast whatever the op returns (the autocast dtype or float32)."""
    size = dtypes.itemsize(job.compute_dtype)
    return max(size, 4) if job.mode.amp else size


def room(job: Job) -> tuple[int, int]:
    """The arena bytes of a job's input slot and answer slot (a tensor that lives in a
    client's CUDA region takes none)."""
    out_bytes = 0 if job.device_out is not None else job.numel * answer_itemsize(job)
    in_bytes = 0 if job.device_in is not None else job.array.nbytes
    if job.grad_output is not None:  # after the input, on a slot boundary
        in_bytes = aligned(in_bytes) + job.grad_output.nbytes
    if "grad" in job.outputs:  # at the end of the answer's room, on a slot boundary
        out_bytes = aligned(out_bytes) + job.array.nbytes
    return in_bytes, out_bytes


def copy_out(job: Job) -> None:
    """Move a job's tensors out of a lent slot (it is given back)."""
    job.array = job.array.copy()
    if job.grad_output is not None:
        job.grad_output = job.grad_output.copy()


class Slots:
    def __init__(self, arena: Arena, lender: Lender) -> None:
        self.arena = arena
        self.lender = lender

    def check(self, p: Pending) -> None:
        need = p.in_bytes + p.out_bytes
        if need > self.arena.size:
            raise RequestTooLarge(
                f"the request needs {need} bytes of shared memory for its input and answer; "
                f"the server has {self.arena.size} (ACTSERVE_SHM_ARENA_MIB)")

    def adopt(self, p: Pending, lent: LentBody) -> bool:
        """Use the lent slot the job's input already lies in; False when the layout is not
        the engine's (input on a slot boundary, the upstream gradient on the next) or the
        answer has no room now."""
        job = p.job
        at = self.lender.offset(job.array)
        if at % ALIGN or not job.array.flags.c_contiguous:
            return False
        if job.grad_output is not None and (
                not job.grad_output.flags.c_contiguous
                or self.lender.offset(job.grad_output) != at + aligned(job.array.nbytes)):
            return False
        try:
            p.out_off = self.arena.alloc(p.out_bytes)
        except ArenaFull:
            return False
        self.lender.adopt(lent)
        p.in_off = at
        p.lent = (lent.slot, lent.slot_bytes)
        return True

    def place(self, p: Pending) -> bool:
        """Reserve both slots and copy the input in; False when the arena is full."""
        arena = self.arena
        try:
            p.in_off = arena.alloc(p.in_bytes)
        except ArenaFull:
            return False
        try:
            p.out_off = arena.alloc(p.out_bytes)
        except ArenaFull:
            arena.free(p.in_off, p.in_bytes)
            p.in_off = -1
            return False
        job = p.job
        if job.device_in is None:  # else the input stays in the client's CUDA region
            arena.view(p.in_off, job.array.nbytes)[:] = job.array.reshape(-1).view("u1")
        if job.grad_output is not None:
            at = p.in_off + aligned(job.array.nbytes)
            arena.view(at, job.grad_output.nbytes)[:] = job.grad_output.reshape(-1).view("u1")
        return True

    def free(self, p: Pending) -> None:
        """Give a job's slots back (the engine is done with them)."""
        if p.lent is not None:
            self.arena.free(*p.lent)
        elif p.in_off >= 0:
            self.arena.free(p.in_off, p.in_bytes)
        if p.out_off >= 0:
            self.arena.free(p.out_off, p.out_bytes)

    def answer(self, p: Pending, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.arena.array(p.out_off, dtypes.STORAGE[dtype], shape)

    def gradient(self, p: Pending, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The gradient, at the end of the answer's slot."""
        at = p.out_off + p.out_bytes - p.job.array.nbytes
        return self.arena.array(at, dtypes.STORAGE[dtype], shape)
