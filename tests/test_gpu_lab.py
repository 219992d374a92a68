"""The lab on CUDA (docs/lab.md): gradients equal autograd on the GPU for that request alone,
also when they share a batch with packed value requests; the numerics report and a profile
with CUDA kernels. Skipped cleanly without CUDA."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch

from service import dtypes

from .conftest import REGISTRY, same_bits, serve
from .test_correctness import _values
from .test_gradients import _storage, binary_request, split_parts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_server():
    with serve(device="cuda", engine="inline", allow_profile=True) as srv:
        yield srv


def cuda_autograd(name: str, x: np.ndarray, wire: str, g: np.ndarray):
    act = REGISTRY.get(name)
    kwargs = dict(act.parse_params({}))

    def dev(a):
        t = torch.from_numpy(a.copy().view(np.int16)).view(torch.bfloat16) \
            if wire == "bfloat16" else torch.from_numpy(a.copy())
        return t.to("cuda:0")

    xt = dev(x).requires_grad_(True)
    y = act.fn(xt, **kwargs)
    (grad,) = torch.autograd.grad(y, xt, dev(g).to(y.dtype))
    return _storage(y.detach().cpu()), _storage(grad.cpu())


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_cuda_gradients_equal_autograd_alone_in_shared_batches(cuda_server, wire):
    async def run(reqs):
        async with httpx.AsyncClient(base_url=cuda_server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post(**r) for r in reqs))

    for name in REGISTRY.names():
        spec = dict(name=name, wire=wire, compute=None, amp=False, amp_dtype=None,
                    inplace=False, params={}, shape=(65_537,))
        x = _values(np.random.default_rng(1), 65_537, wire)
        g = _values(np.random.default_rng(2), 65_537, wire)
        plain = binary_request(spec, x, None, outputs="value")
        reqs = [binary_request(spec, x, g), plain, plain]
        grad_resp, *_ = asyncio.run(run(reqs))
        assert grad_resp.status_code == 200, grad_resp.text
        (value, _), (grad, gdtype) = cuda_autograd(name, x, wire, g)
        parts = split_parts(grad_resp)
        assert same_bits(parts["value"], value), name
        assert same_bits(parts["grad"], grad), name
        assert gdtype == wire


def test_cuda_numerics_and_profile(cuda_server):
    x = dtypes.from_float(np.linspace(-10, 10, 1 << 20), "float16")
    with httpx.Client(base_url=cuda_server.url, timeout=120) as c:
        r = c.post("/v1/activations/gelu", content=x.tobytes(),
                   params={"shape": str(x.size), "dtype": "float16",
                           "report": "numerics,profile"},
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        numerics = json.loads(r.headers["x-report-numerics"])
        assert numerics["dtype"] == "float16" and numerics["max_ulp_error"] < 8
        assert r.headers["x-outputs"] == "value,profile"
        prof = split_parts(r)["profile"]
        assert prof["device"] == "cuda:0"
        assert any(row["self_device_us"] > 0 for row in prof["operators"]), prof["operators"]
        assert c.get(prof["trace_url"]).status_code == 200


def test_cuda_batch_norm_layers_are_computed_request_by_request(cuda_server):
    """A batch-norm layer on CUDA: requests held in one batch (eval mode and batch_stats)
    each equal the layer applied to that request alone on the GPU."""
    from service.engine import custom
    from service.engine.job import Mode
    from service.engine.reference import reference

    from .gates import held

    spec = {"name": "gpu_bn_elu", "expr": "elu(x)",
            "batch_norm": {"running_mean": [0.5, -1.0, 0.0, 2.0],
                           "running_var": [1.5, 0.25, 1.0, 4.0],
                           "weight": [1.0, 2.0, 0.5, -1.0], "bias": [0.0, 0.1, -0.2, 0.3]}}
    act = custom.build(spec)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(shape).astype(np.float32) * 3
          for shape in ((1, 4), (7, 4), (64, 4), (5, 4, 33))]
    stats = [False, True, False, True]

    async def run():
        async with httpx.AsyncClient(base_url=cuda_server.url, timeout=60) as c:
            assert (await c.post("/v1/activations", json=spec)).status_code == 201
            async with held(cuda_server.engine, len(xs)):
                tasks = [asyncio.ensure_future(c.post(
                    "/v1/activations/gpu_bn_elu", content=x.tobytes(),
                    params={"shape": ",".join(map(str, x.shape)),
                            "batch_stats": str(s).lower()},
                    headers={"content-type": "application/octet-stream"}))
                    for x, s in zip(xs, stats, strict=True)]
            return [await t for t in tasks]

    responses = asyncio.run(run())
    for x, s, r in zip(xs, stats, responses, strict=True):
        assert r.status_code == 200, r.text
        params = act.parse_params({"batch_stats": s})
        want = reference(act, params, x, "float32", Mode(None, False, None, False), "cuda:0")[0]
        assert same_bits(np.frombuffer(r.content, np.float32).reshape(x.shape), want)
    assert max(int(r.headers["x-batch-size"]) for r in responses) >= 2
