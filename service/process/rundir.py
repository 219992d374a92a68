"""The files one multi-process server instance shares between its processes.

Everything lives in one directory, ``/dev/shm/actserve-<supervisor pid>-<token>`` (the
system temp dir where there is no ``/dev/shm``), made by the supervisor, mode 0700:

* ``ready``: one byte per worker slot, 1 while that worker is ready (``ReadyFlags``);
* ``w<slot>.sock``: the worker's Unix socket for snapshots (``peers.py``);
* ``snap/``: each worker's periodic snapshot and the retired snapshots of dead workers;
* ``activations/``: with the inline engine, one ``<name>.json`` per custom activation
  registered at run time (``shared_registrations.py``).

The supervisor removes the directory when it exits. A server that was killed (SIGKILL, a
crash) leaves it behind: the next supervisor to start removes every entry named exactly
``actserve-<pid>-<token>`` (8 hex digits) that this user owns and whose pid is no longer
running (``clean_stale``); anything it cannot remove is skipped. Longer names that merely
start that way (the client SDK's ``actserve-<pid>-<token>-<n>`` segments) are never touched,
so anything else an instance puts in ``/dev/shm`` must be named exactly that way too.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
from pathlib import Path

from service.engine.ipc.arena import pid_alive

# Exactly the names an instance makes: its run directory and the engine arenas, both
# ``actserve-<pid>-<8 hex>`` (``RunDir.create``, ``ipc/arena.py``). The client SDK names its
# own segments ``actserve-<pid>-<8 hex>-<n>``: never matched, never removed.
_NAME = re.compile(r"actserve-(\d+)-[0-9a-f]{8}")


def base_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def clean_stale(base: Path | None = None) -> list[str]:
    """Remove what instances whose supervisor is gone left in ``base``; returns the names."""
    base = base or base_dir()
    removed = []
    for entry in base.iterdir():
        m = _NAME.fullmatch(entry.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            st = entry.lstat()
            if st.st_uid != os.geteuid():  # not this user's: not an instance of ours
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:  # gone meanwhile, or not ours to remove: skipped, start-up goes on
            continue
        removed.append(entry.name)
    return removed


class RunDir:
    """The instance's directory (made by the supervisor; workers open it by path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshots = path / "snap"
        self.activations = path / "activations"

    @classmethod
    def create(cls, base: Path | None = None) -> RunDir:
        base = base or base_dir()
        prefix = f"actserve-{os.getpid()}-{secrets.token_hex(4)}"
        path = base / prefix
        path.mkdir(mode=0o700)
        (path / "snap").mkdir(mode=0o700)
        (path / "activations").mkdir(mode=0o700)
        return cls(path)

    @property
    def prefix(self) -> str:
        """The name every shared file or segment of this instance starts with."""
        return self.path.name

    def socket(self, slot: int) -> Path:
        return self.path / f"w{slot}.sock"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ReadyFlags:
    """One byte per worker slot in a shared, memory-mapped file: a worker writes its own
    byte, any worker reads them all on a readiness probe, the supervisor clears the byte of
    a worker that died. Single-byte writes need no lock. After the bytes, one heartbeat per
    slot (``time.monotonic()`` when that worker's event loop last published its flag, a
    clock every process shares), read by the supervisor's probe port: a worker marked ready
    whose heartbeat has stopped has a stalled loop."""

    def __init__(self, path: Path, count: int, *, create: bool = False) -> None:
        self.count = count
        self._beats = -(-count // 8) * 8  # the heartbeats' offset, 8-byte aligned
        size = self._beats + 8 * count
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def set(self, slot: int, ready: bool) -> None:
        self._map[slot] = 1 if ready else 0

    def get(self, slot: int) -> bool:
        return self._map[slot] == 1

    def not_ready(self) -> list[int]:
        return [s for s in range(self.count) if self._map[s] != 1]

    def beat(self, slot: int, now: float) -> None:
        struct.pack_into("d", self._map, self._beats + 8 * slot, now)

    def stalled(self, now: float, limit_s: float) -> dict[int, float]:
        """Ready slots whose heartbeat is older than ``limit_s``: slot -> its age."""
        ages = {}
        for s in range(self.count):
            if self._map[s] == 1:
                age = now - struct.unpack_from("d", self._map, self._beats + 8 * s)[0]
                if age > limit_s:
                    ages[s] = age
        return ages

    def close(self) -> None:
        self._map.close()
