"""CUDA paths: packed staging buffers, non-blocking copies, a dedicated stream, CUDA-event
timing, and bit-exact batch invariance on the GPU. Skipped cleanly without CUDA."""

from __future__ import annotations

import itertools

import httpx
import numpy as np
import pytest
import torch

from service import dtypes
from service.engine.compute import DeviceCompute
from service.engine.job import Job, JobResult, Mode
from service.engine.reference import lone_job, reference

from .conftest import REGISTRY, same_bits, serve

pytestmark = pytest.mark.gpu

AMP = [(False, None), (True, None), (True, "bfloat16")]


def _job(name, values, wire, mode, fault=None):
    act = REGISTRY.get(name)
    return lone_job(act, act.parse_params({}), values, wire, mode, fault=fault)


def _lone_on_gpu(job: Job) -> np.ndarray:
    return reference(job.activation, job.params, job.array, job.wire_dtype, job.mode, "cuda:0")[0]


@pytest.mark.parametrize("name", REGISTRY.names())
def test_packed_gpu_batch_equals_lone_gpu_reference(name):
    compute = DeviceCompute(torch.device("cuda:0"))
    rng = np.random.default_rng(0)
    act = REGISTRY.get(name)
    for wire, (amp, amp_dtype), inplace in itertools.product(
            dtypes.NAMES, AMP, (False, True) if act.supports_inplace else (False,)):
        mode = Mode(None, amp, amp_dtype, inplace)
        sizes = (0, 1, 3, 1000, 65_537, 1_000_003)
        jobs = [_job(name, dtypes.from_float(rng.standard_normal(n) * 5, wire), wire, mode)
                for n in sizes]
        try:
            expected = [_lone_on_gpu(j) for j in jobs]
        except RuntimeError:
            continue  # not supported on this GPU: the capability probe reports it as a 400
        with torch.inference_mode():
            got = compute.run(jobs)
        for n, r, e in zip(sizes, got, expected, strict=True):
            assert isinstance(r, JobResult), r
            assert same_bits(np.asarray(r.array).reshape(e.shape), e), (name, wire, mode, n)
            assert r.extra["h2d"] > 0 and r.compute_s > 0  # CUDA events timed the packed batch


def test_failure_in_a_gpu_batch_is_isolated_to_its_request():
    compute = DeviceCompute(torch.device("cuda:0"), fault_injection=True)
    mode = Mode(None, False, None, False)
    jobs = [_job("tanh", np.ones(100 + i, dtype="<f4"), "float32", mode,
                 fault="compute" if i == 2 else None) for i in range(5)]
    with torch.inference_mode():
        results = compute.run(jobs)
    assert [isinstance(r, JobResult) for r in results] == [True, True, False, True, True]


def test_server_on_cuda_reports_gpu_memory_and_exact_results():
    with serve(device="cuda") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        x = np.random.default_rng(1).standard_normal(4096).astype("<f4")
        r = c.post("/v1/activations/gelu", params={"shape": "4096"}, content=x.tobytes(),
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        lone = _lone_on_gpu(_job("gelu", x, "float32", Mode(None, False, None, False)))
        assert same_bits(np.frombuffer(r.content, "<f4"), lone)
        metrics = c.get("/metrics").text
        assert 'actserve_gpu_memory_peak_bytes{device="cuda:0"}' in metrics


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "leaky_relu"])
def test_a_batch_straight_from_pinned_slots_equals_the_lone_reference(name):
    """The engine process registers its workers' arenas as pinned memory; large batches then
    go to the device from their slots and come back into the answer slots by DMA, with no
    host staging (``compute._run_cuda_slots``). Same bits as the lone GPU reference."""
    from service.engine.ipc import pinning
    from service.engine.ipc.arena import ALIGN, Arena

    arena = Arena.create(96 << 20)
    try:
        assert pinning.pin(arena)
        compute = DeviceCompute(torch.device("cuda:0"))
        rng = np.random.default_rng(1)
        for wire, (amp, amp_dtype) in itertools.product(dtypes.NAMES, AMP):
            mode = Mode(None, amp, amp_dtype, False)
            jobs, expected, at = [], [], 0
            for n in (300_001, 1_000_003, 70_000):
                x = dtypes.from_float(rng.standard_normal(n) * 5, wire)
                expected.append(_lone_on_gpu(_job(name, x.copy(), wire, mode)))
                slot = arena.view(at, x.nbytes)
                slot[:] = x.view(np.uint8)
                at += -(-x.nbytes // ALIGN) * ALIGN
                job = _job(name, slot.view(x.dtype), wire, mode)
                job.out = arena.view(at, n * 8)  # room for the widest answer
                at += -(-(n * 8) // ALIGN) * ALIGN
                jobs.append(job)
            before = compute.slot_batches
            with torch.inference_mode():
                got = compute.run(jobs)
            assert compute.slot_batches == before + 1, (wire, mode)
            for job, r, e in zip(jobs, got, expected, strict=True):
                assert isinstance(r, JobResult), r
                assert np.may_share_memory(r.array, job.out)  # answered in its slot
                assert same_bits(np.asarray(r.array).reshape(e.shape), e), (name, wire, mode)
                assert r.extra["h2d"] > 0 and r.compute_s > 0
        pinning.unpin(arena)
    finally:
        arena.close()
