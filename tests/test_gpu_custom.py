"""Custom activations on CUDA (the packed path): a batch of requests of one expression
equals each request computed alone on the GPU, bit for bit. Skipped cleanly without CUDA."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from service import dtypes
from service.engine import custom
from service.engine.compute import DeviceCompute
from service.engine.job import JobResult, Mode
from service.engine.reference import lone_job, reference

from .conftest import same_bits, serve

pytestmark = pytest.mark.gpu

EXPRS = ["relu(x) * sigmoid(x)", "x if x > 0 else 0.5 * (exp(x) - 1)",
         "clamp(x, -1, 1) ** 2 + maximum(x, 0.1 * x)", "tanh(softplus(x)) * x"]


SIZES = (0, 1, 3, 1000, 65_537, 1_000_003)


def _check_packed_equals_alone(act, wire: str, seed: int) -> None:
    """One packed CUDA batch of ``SIZES`` equals each request alone on the GPU
    (``reference``, through ``act.apply``), bit for bit."""
    compute = DeviceCompute(torch.device("cuda:0"))
    rng = np.random.default_rng(seed)
    mode = Mode(None, False, None, False)
    jobs = [lone_job(act, (), dtypes.from_float(rng.standard_normal(n) * 5, wire), wire, mode)
            for n in SIZES]
    expected = [reference(act, (), j.array, wire, mode, "cuda:0")[0] for j in jobs]
    with torch.inference_mode():
        got = compute.run(jobs)
    for n, r, e in zip(SIZES, got, expected, strict=True):
        assert isinstance(r, JobResult), r
        assert same_bits(np.asarray(r.array).reshape(e.shape), e), (act.formula, wire, n)


@pytest.mark.parametrize("text", EXPRS)
@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_packed_gpu_batch_equals_lone_gpu_reference(text, wire):
    _check_packed_equals_alone(custom.build({"name": "g", "expr": text}), wire, 1)


def test_server_on_cuda_serves_registered_and_inline_expressions():
    x = np.random.default_rng(2).standard_normal(4099).astype(np.float32)
    act = custom.build({"name": "gate", "expr": EXPRS[0]})
    expected = reference(act, (), x, "float32", Mode(None, False, None, False), "cuda:0")[0]
    with serve(device="cuda", engine="inline") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/activations", json={"name": "gate", "expr": EXPRS[0]}).status_code == 201
        headers = {"content-type": "application/octet-stream"}
        r = c.post("/v1/activations/gate", params={"shape": "4099"}, content=x.tobytes(),
                   headers=headers)
        assert r.status_code == 200 and same_bits(np.frombuffer(r.content, np.float32), expected)
        r = c.post("/v1/activations/expr", params={"shape": "4099", "expr": EXPRS[0]},
                   content=x.tobytes(), headers=headers)
        assert r.status_code == 200 and same_bits(np.frombuffer(r.content, np.float32), expected)


def test_fusion_compiles_on_cuda_and_a_packed_batch_equals_each_request_alone():
    """A registered expression is compiled (fusion.py); the packed CUDA batch, computed with
    the compiled kernel, equals each request computed alone with it, bit for bit."""
    from service.engine import fusion

    act = custom.build({"name": "fused", "expr": "x * sigmoid(1.702 * x)"})
    fuser = fusion.Fuser("auto", "cuda:0")
    fuser.attach(act)
    assert act.fusion.entry.decided.result(240), "compiling took over 240 s"
    described = act.describe()["fusion"]
    assert described["state"] == "compiled", described
    assert set(described["max_ulp_vs_eager"]) == {"float32", "float16", "bfloat16"}
    assert all(0 <= v <= fusion.MAX_ULP for v in described["max_ulp_vs_eager"].values())
    for wire in ("float32", "float16", "bfloat16"):
        _check_packed_equals_alone(act, wire, 3)  # the compiled form, packed and alone
