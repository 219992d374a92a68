"""Short GPU benchmark: the executor's packed CUDA path against raw torch, per dtype, AMP
and in-place, with peak memory. Prints a markdown table. Needs CUDA."""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from loadtest import inprocess
from service import dtypes
from service.engine.activations import Registry
from service.engine.compute import TORCH_DTYPES, DeviceCompute
from service.engine.job import Mode
from service.engine.reference import lone_job

N = 1 << 20  # elements per request
REQUESTS = 16  # requests per batch
REPEATS = 15


def _bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1
    dev = torch.device("cuda:0")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    reg = Registry()
    compute = DeviceCompute(dev)
    rows = []
    for name in ("relu", "gelu", "silu", "relu_sigmoid"):
        act = reg.get(name)
        params = act.parse_params({})
        for wire, amp, inplace in [("float32", False, False), ("float16", False, False),
                                   ("bfloat16", False, False), ("float32", True, False),
                                   ("float32", False, True)]:
            if inplace and not act.supports_inplace:
                continue
            mode = Mode(None, amp, None, inplace)
            arrays = [dtypes.from_float(np.random.default_rng(i).standard_normal(N), wire)
                      for i in range(REQUESTS)]
            jobs = [lone_job(act, params, a, wire, mode) for a in arrays]
            torch.cuda.reset_peak_memory_stats(dev)
            with torch.inference_mode():
                t_exec = _bench(lambda: compute.run(jobs))
            peak = torch.cuda.max_memory_allocated(dev)
            x = torch.randn(N * REQUESTS, device=dev).to(TORCH_DTYPES[wire])

            def raw():
                with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
                    act.apply(x.clone() if inplace else x, inplace, params)

            t_raw = _bench(raw)
            host = torch.empty(N * REQUESTS, dtype=TORCH_DTYPES[wire], pin_memory=True)
            back = torch.empty_like(host, pin_memory=True)  # pinned both ways, as the executor
            t_copy = _bench(lambda: back.copy_(host.to(dev, non_blocking=True), non_blocking=True))
            elems = N * REQUESTS
            rows.append((name, wire, amp, inplace, elems / t_exec / 1e9, elems / t_raw / 1e9,
                         elems / t_copy / 1e9, peak / 2**20))
    print("| activation | dtype | amp | inplace | executor Gelem/s (H2D+compute+D2H) | "
          "raw torch Gelem/s (on device) | H2D+D2H copy Gelem/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | "
              f"{r[7]:.0f} |")
    engine_path(dev, reg)
    return 0


def engine_path(dev: torch.device, reg: Registry) -> None:
    """The whole in-process path (job build, batcher, compute thread, CUDA, result back on the
    event loop) against raw torch doing the same host -> device -> activation -> host trip."""
    print()
    print("| activation | elements per request | in flight | Engine.submit Gelem/s | "
          "raw torch H2D+act+D2H Gelem/s | ratio | mean batch elements |")
    print("|---|---|---|---|---|---|---|")
    for name in ("relu", "gelu"):
        act = reg.get(name)
        params = act.parse_params({})
        loads = [(1 << 20, 1), (1 << 20, 8), (1 << 16, 64)]
        for res in inprocess.executor_path(name, loads, 1.5, device=str(dev)):
            size = res["size"]
            host = torch.from_numpy(np.random.default_rng(size).standard_normal(size)
                                    .astype(np.float32))

            def raw(host=host):
                with torch.inference_mode():
                    return act.apply(host.to(dev), False, params).cpu()

            t_raw = _bench(raw)
            raw_rate = size / t_raw / 1e9
            ex = res["elements_per_s"] / 1e9
            print(f"| {name} | {size:,} | {res['concurrency']} | {ex:.2f} | {raw_rate:.2f} | "
                  f"{ex / raw_rate:.2f} | {res['mean_batch_elements']:,.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
