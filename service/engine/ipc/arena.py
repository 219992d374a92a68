"""Shared-memory arenas: one file under ``/dev/shm`` per worker, mapped by the worker and by
the engine process. The worker owns its arena: it allocates a slot for each request's
input and one for its answer, and frees them only when the engine has said its last word
about that request. The engine maps every worker's arena and reads and writes slots at
the offsets the worker names; it never allocates.

Names are ``actserve-<pid>-<random>``: ``sweep_stale`` unlinks arenas whose creator is
gone (a SIGKILLed worker), so segments never pile up. The file is reserved with
``posix_fallocate`` at creation, so a full ``/dev/shm`` fails at start-up with a clear
error instead of a SIGBUS on the first write.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
PREFIX = "actserve-"
ALIGN = 64  # every slot starts on a cache line
_NAME = re.compile(r"^actserve-(\d+)-[0-9a-f]{8}$")


def is_arena(name: str) -> bool:
    """Whether ``name`` (a file under /dev/shm) is the name of an engine arena."""
    return bool(_NAME.match(name))


class ArenaFull(Exception):
    """No free run of the size asked for, right now."""


class Arena:
    """A mapped shared-memory file and, in its owner, a first-fit allocator of slots."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)
        self.address = self.buffer.ctypes.data  # of the mapping, in this process
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset
        self.used = 0

    # -- life --------------------------------------------------------------------------
    @classmethod
    def create(cls, size: int) -> Arena:
        size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise OSError(f"cannot reserve {size} bytes in {SHM_DIR} for the engine's shared "
                              f"memory ({exc.strerror}); give the container more /dev/shm "
                              "(--shm-size) or lower ACTSERVE_SHM_ARENA_MIB") from None
            return cls(name, fd, size, owner=True)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, name: str) -> Arena:
        if not _NAME.match(name):
            raise ValueError(f"not an arena name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            return cls(name, fd, os.fstat(fd).st_size, owner=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap (views must be gone); the owner also unlinks the file."""
        self.buffer = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass
        if self.owner:
            unlink(self.name)

    # -- slots (owner only) ----------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, length - need)
                self.used += need
                return off
        raise ArenaFull(f"no {need}-byte run free in the {self.size}-byte arena")

    def free(self, offset: int, nbytes: int) -> None:
        length = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        self.used -= length
        runs = self._free
        lo, hi = 0, len(runs)
        while lo < hi:  # insertion point by offset
            mid = (lo + hi) // 2
            if runs[mid][0] < offset:
                lo = mid + 1
            else:
                hi = mid
        runs.insert(lo, (offset, length))
        if lo + 1 < len(runs) and offset + length == runs[lo + 1][0]:  # merge the next run
            runs[lo] = (offset, length + runs[lo + 1][1])
            del runs[lo + 1]
        if lo > 0 and runs[lo - 1][0] + runs[lo - 1][1] == offset:  # merge into the previous
            runs[lo - 1] = (runs[lo - 1][0], runs[lo - 1][1] + runs[lo][1])
            del runs[lo]

    # -- views -------------------------------------------------------------------------
    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` at ``offset`` as bytes, checked against the arena's size."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"slot {offset}+{nbytes} is outside the {self.size}-byte arena")
        return self.buffer[offset:offset + nbytes]

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)  # python ints: exact, and far cheaper than np.prod
        return self.view(offset, count * dtype.itemsize).view(dtype).reshape(shape)


def unlink(name: str) -> None:
    try:
        (SHM_DIR / name).unlink()
    except FileNotFoundError:
        pass


def sweep_stale() -> list[str]:
    """Unlink arenas whose creating process is gone; the names removed. Only regular files
    of this user are arenas: a killed supervisor's run directory (the same name pattern;
    ``process/rundir.py`` sweeps those) or anything another user planted is skipped, and an
    entry that cannot be removed is left, never a failed start."""
    removed = []
    for path in SHM_DIR.glob(PREFIX + "*"):
        m = _NAME.match(path.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            unlink(path.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(path.name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
