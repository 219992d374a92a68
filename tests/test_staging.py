"""Packing requests into the CUDA staging buffer, sequentially or in pieces on threads: the
same bytes at the same offsets either way (runs on CPU; the GPU tests cover the rest)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service import dtypes
from service.engine import compute
from service.engine.compute import ALIGN, stage
from service.engine.reference import lone_job

from .conftest import REGISTRY


def _jobs(wire: str, sizes):
    rng = np.random.default_rng(3)
    act = REGISTRY.get("relu")
    return [lone_job(act, (), dtypes.from_float(rng.standard_normal(n), wire), wire)
            for n in sizes]


def test_threaded_staging_equals_sequential_staging():
    sizes = (3, 1_000_003, 0, compute.STAGE_PIECE * 2 + 5, 70_000)
    for wire in ("float32", "bfloat16", "float16"):
        jobs = _jobs(wire, sizes)
        offsets, total = [], 0
        for j in jobs:
            offsets.append(total)
            total += -(-j.numel // ALIGN) * ALIGN
        storage = dtypes.STORAGE[wire]
        one = np.zeros(total, storage)
        stage(one, jobs, offsets, None)
        with ThreadPoolExecutor(3) as pool:
            many = np.zeros(total, storage)
            assert many.nbytes >= compute.STAGE_PARALLEL_BYTES
            stage(many, jobs, offsets, pool)
        assert one.tobytes() == many.tobytes()
        for j, off in zip(jobs, offsets, strict=True):
            assert one[off:off + j.numel].tobytes() == j.array.tobytes()
