"""Where the CPU went during a wrk run: the server's processes (a supervisor's workers
included), the load generator (this process's finished children: wrk) and the idle time of
the whole machine, so that a ratio measured on a shared
machine says whether there were cores to spare (Linux ``/proc``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        todo += _children(p)
    return total


def _machine() -> tuple[float, float]:
    """(idle, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values[:8])  # idle + iowait


class CpuMeter:
    """``with CpuMeter(pid) as m: ...`` then ``m.result()``: the server's cores in use and
    the machine's idle cores over the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> CpuMeter:
        self._t = time.monotonic()
        self._cpu = tree_cpu_seconds(self.pid)
        self._idle, self._total = _machine()
        self._children = _reaped()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._t
        idle, total = _machine()
        cores = os.cpu_count() or 1
        self.server_cores = (tree_cpu_seconds(self.pid) - self._cpu) / wall if wall else 0.0
        share = (idle - self._idle) / (total - self._total) if total > self._total else 0.0
        self.idle_cores = share * cores
        self.client_cores = (_reaped() - self._children) / wall if wall else 0.0

    def result(self) -> dict:
        return {"server_cores": round(self.server_cores, 3),
                "client_cores": round(self.client_cores, 3),
                "idle_cores": round(self.idle_cores, 3)}


def _reaped() -> float:
    t = os.times()
    return t.children_user + t.children_system
