"""The ``lab`` measurement: a registered custom activation against the hand-written torch
composition it stands for, in-process, on the server's compute thread settings (1 intra-op
thread), on CPU.

    python -m loadtest.lab_bench [--elements 1048576] [--repeats 30]

Both sides run through ``DeviceCompute.run`` (the executor's CPU path, one request alone):
the custom ``relu(x) * sigmoid(x)`` built from its expression, and the built-in
``relu_sigmoid`` (``F.relu(x) * torch.sigmoid(x)``). The bar: custom median <= 1.3x the
hand-written median. Prints one JSON line. ``make bench`` runs it as the ``lab`` group
(``python -m loadtest.bench --groups lab``), whose bar is in the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from service.engine import custom
from service.engine.activations import Registry
from service.engine.compute import DeviceCompute
from service.engine.job import JobResult
from service.engine.reference import lone_job

BAR = 1.3
ELEMENTS = 1 << 20
REPEATS = 30


def _median_s(compute: DeviceCompute, act, x: np.ndarray, repeats: int) -> float:
    job = lone_job(act, (), x, "float32")
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        (result,) = compute.run([job])
        times.append(time.perf_counter() - t0)
        assert isinstance(result, JobResult), result
    return statistics.median(times[2:])  # two warm-up runs


def measure(elements: int = ELEMENTS, repeats: int = REPEATS) -> dict:
    torch.set_num_threads(1)
    compute = DeviceCompute(torch.device("cpu"))
    x = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    mine = custom.build({"name": "lab_gate", "expr": "relu(x) * sigmoid(x)"})
    hand = Registry().get("relu_sigmoid")
    # interleave the two, so drift on a shared machine hits both alike
    c, h = [], []
    for _ in range(3):
        c.append(_median_s(compute, mine, x, repeats // 3 or 1))
        h.append(_median_s(compute, hand, x, repeats // 3 or 1))
    custom_s, hand_s = statistics.median(c), statistics.median(h)
    ratio = custom_s / hand_s
    return {"group": "lab", "elements": elements, "custom_ms": round(custom_s * 1e3, 3),
            "hand_ms": round(hand_s * 1e3, 3), "ratio": round(ratio, 3), "bar": BAR,
            "passed": ratio <= BAR}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=ELEMENTS)
    p.add_argument("--repeats", type=int, default=REPEATS)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.elements, a.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
