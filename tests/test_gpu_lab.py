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
