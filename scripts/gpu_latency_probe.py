"""Where a lone small request's time goes on the GPU path: each step of the packed CUDA path
timed on the host (medians of 300), then Engine.submit round trips on cuda and cpu.

    python -m scripts.gpu_latency_probe [--size 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np
import torch

from loadtest import inprocess
from service.engine.activations import Registry
from service.engine.compute import DeviceCompute, apply_alone
from service.engine.reference import lone_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    a = p.parse_args(argv)
    dev = torch.device("cuda:0")
    act = Registry().get("gelu")
    x = np.random.default_rng(0).standard_normal(a.size).astype(np.float32)
    job = lone_job(act, act.parse_params({}), x, "float32")
    stream = torch.cuda.Stream(device=dev)
    steps: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        t = time.perf_counter()
        steps.setdefault(name, []).append((t - t0) * 1e6)
        return t

    with torch.inference_mode():
        for i in range(330):
            t = time.perf_counter()
            host_in = torch.empty(a.size, dtype=torch.float32, pin_memory=True)
            t = lap("pinned alloc in", t)
            host_in.numpy()[:] = x
            t = lap("staging copy", t)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            t = lap("4 events", t)
            with torch.cuda.stream(stream):
                ev[0].record(stream)
                d = host_in.to(dev, non_blocking=True)
                ev[1].record(stream)
                t = lap("H2D issue", t)
                y = apply_alone(job, d)
                ev[2].record(stream)
                t = lap("kernel issue", t)
                host_out = torch.empty(y.numel(), dtype=y.dtype, pin_memory=True)
                t = lap("pinned alloc out", t)
                host_out.copy_(y, non_blocking=True)
                ev[3].record(stream)
                t = lap("D2H issue", t)
            ev[3].synchronize()
            t = lap("event sync", t)
            ev[1].elapsed_time(ev[2])
            lap("elapsed", t)
            if i == 29:
                steps.clear()  # warm-up
        print(f"packed CUDA path, one {a.size}-element gelu request, host-side medians (us):")
        for name, vals in steps.items():
            print(f"  {name:18s} {statistics.median(vals):8.1f}")
        dc = DeviceCompute(dev)
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            dc.run([job])
            times.append((time.perf_counter() - t0) * 1e6)
        print(f"  DeviceCompute.run  {statistics.median(times[30:]):8.1f}")
    reads = []
    for _ in range(50):
        t0 = time.perf_counter()
        torch.cuda.memory_allocated(dev)
        torch.cuda.max_memory_allocated(dev)
        reads.append((time.perf_counter() - t0) * 1e6)
    print(f"  memory_allocated + max_memory_allocated {statistics.median(reads):8.1f}")
    in_thread: list[float] = []

    def other_thread() -> None:
        dc2 = DeviceCompute(dev)
        with torch.inference_mode():
            for _ in range(300):
                t0 = time.perf_counter()
                dc2.run([job])
                in_thread.append((time.perf_counter() - t0) * 1e6)

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    print(f"  DeviceCompute.run in a second thread {statistics.median(in_thread[30:]):8.1f}")
    # The compute thread's own wall time per batch, inside Engine.submit.
    walls: list[float] = []
    original = DeviceCompute.run

    def timed(self, jobs):
        t0 = time.perf_counter()
        try:
            return original(self, jobs)
        finally:
            walls.append((time.perf_counter() - t0) * 1e6)

    DeviceCompute.run = timed
    for device in ("cuda:0", "cpu"):
        walls.clear()
        r = inprocess.executor_path("gelu", [(a.size, 1)], 1.5, device=device)[0]
        print(f"Engine.submit lone {a.size}-element job on {device}: "
              f"{a.size / r['elements_per_s'] * 1e6:.0f} us; compute thread wall per batch "
              f"{statistics.median(walls[len(walls) // 10:]):.0f} us")
    DeviceCompute.run = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
