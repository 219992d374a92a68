"""How many cores this process may use: ``ACTSERVE_WORKERS=auto``."""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may run on (``sched_getaffinity``), lowered to its cgroup's CPU
    quota rounded up where one is set (a container's or a pod's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
