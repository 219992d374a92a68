"""One request run under ``torch.profiler`` (docs/lab.md, "Profiles"): its operator table
and its Chrome trace. Runs only in a compute thread, and only for requests that ask (the
server must allow it: ``--allow-profile``); nothing here is touched otherwise.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity

T = TypeVar("T")
MAX_ROWS = 40
MAX_TRACE_BYTES = 32 << 20


def _first(event, *names: str) -> float:
    """The first of ``names`` this torch version's event has (the CUDA fields were renamed
    ``device`` in torch 2.4+)."""
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return value
    return 0


def table(prof) -> list[dict]:
    """Operators by self time (device, then CPU), heaviest first."""
    rows = []
    for e in prof.key_averages():
        rows.append({
            "name": e.key,
            "calls": int(e.count),
            "self_cpu_us": round(float(e.self_cpu_time_total), 3),
            "cpu_total_us": round(float(e.cpu_time_total), 3),
            "self_device_us": round(float(_first(e, "self_device_time_total",
                                                 "self_cuda_time_total")), 3),
            "self_cpu_memory_bytes": int(e.self_cpu_memory_usage),
            "self_device_memory_bytes": int(_first(e, "self_device_memory_usage",
                                                   "self_cuda_memory_usage")),
        })
    rows.sort(key=lambda r: (r["self_device_us"], r["self_cpu_us"]), reverse=True)
    return rows[:MAX_ROWS]


def report(job, device: torch.device, run: Callable[[], T]) -> tuple[T, dict]:
    """The profile report of a request (``service/engine/reports/profile.py``)."""
    return profile(device, run)


def profile(device: torch.device, fn: Callable[[], T]) -> tuple[T, dict]:
    """``fn()`` under the profiler on ``device``: its result, and ``{"device", "operators",
    "trace"}`` (the Chrome trace's bytes; None when over ``MAX_TRACE_BYTES``)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True,
                                record_shapes=True) as prof:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fd, path = tempfile.mkstemp(prefix="actserve-trace-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        size = os.path.getsize(path)
        trace = None
        if size <= MAX_TRACE_BYTES:
            with open(path, "rb") as f:
                trace = f.read()
    finally:
        os.unlink(path)
    return out, {"device": str(device), "operators": table(prof), "trace": trace}
