"""Fusion on CUDA: the compiled ``x * sigmoid(1.702 * x)`` (service/engine/fusion.py, as a
registered custom activation gets it) against the eager composition, 16M float32 elements,
CUDA events, median of 20. Bar: compiled >= 2x faster. Prints a markdown table; exit 1 when
the bar is missed or CUDA is absent."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from service.engine import custom, fusion

ELEMENTS = 16 << 20
RUNS = 20
BAR = 2.0


def _median_ms(fn, x: torch.Tensor) -> float:
    times = []
    for _ in range(RUNS + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_fusion_bench: no CUDA device", file=sys.stderr)
        return 1
    act = custom.build({"name": "gelu_sig", "expr": "x * sigmoid(1.702 * x)"})
    t0 = time.perf_counter()
    fusion.Fuser("auto", "cuda:0").attach(act)
    entry = act.fusion.entry
    entry.ready.wait(240)
    described = act.describe()["fusion"]
    if described["state"] != "compiled":
        print(f"gpu_fusion_bench: not compiled: {described}", file=sys.stderr)
        return 1
    x = torch.randn(ELEMENTS, device="cuda:0")
    with torch.inference_mode():
        eager = _median_ms(entry.fn, x)
        fused = _median_ms(entry, x)
    ratio = eager / fused
    print(f"## Fusion on {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| expression | elements | eager ms | compiled ms | speed-up | bar | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| x * sigmoid(1.702 * x) | {ELEMENTS:,} | {eager:.3f} | {fused:.3f} | "
          f"{ratio:.2f}x | >= {BAR}x ({'pass' if ratio >= BAR else 'missed'}) | "
          f"{time.perf_counter() - t0:.1f} |")
    print(f"\nmax ULPs vs eager on the self-test grid: {described['max_ulp_vs_eager']}")
    return 0 if ratio >= BAR else 1


if __name__ == "__main__":
    raise SystemExit(main())
