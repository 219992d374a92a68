"""Batch-norm + activation layers: equal, bit for bit, to ``nn.BatchNorm1d/2d`` in eval()
followed by the same composition (and, with ``batch_stats=true``, to train()'s
normalisation of that request alone); wrong channel counts are 400s."""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import custom
from service.errors import InvalidRequest
from tests.conftest import same_bits, serve

C = 4


def _module(cls=nn.BatchNorm1d) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    bn = cls(C)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g))
    return bn.eval()


class GateLayer(nn.Module):
    """Batch norm, then relu(y) * sigmoid(y)."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) * torch.sigmoid(y)


class ELULayer(nn.Module):
    """Batch norm, then ELU written by hand with alpha."""

    def __init__(self, bn: nn.Module, alpha: float) -> None:
        super().__init__()
        self.bn, self.alpha = bn, alpha

    def forward(self, x):
        y = self.bn(x)
        return torch.where(y > 0, y, self.alpha * (torch.exp(y) - 1))


def _raw(bn: nn.Module, name: str, expr: str, **extra) -> dict:
    return {"name": name, "expr": expr, **extra, "batch_norm": {
        "running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist(),
        "weight": bn.weight.tolist(), "bias": bn.bias.tolist(), "eps": bn.eps}}


GATE_EXPR = "relu(x) * sigmoid(x)"
ELU_EXPR = "x if x > 0 else alpha * (exp(x) - 1)"
ELU_PARAMS = {"alpha": {"default": 1.0, "min": 0, "max": 10}}


@pytest.mark.parametrize(("cls", "shape"), [(nn.BatchNorm1d, (64, C)), (nn.BatchNorm1d, (8, C, 33)),
                                            (nn.BatchNorm2d, (2, C, 5, 7))])
def test_equals_the_modules_in_eval(cls, shape):
    bn = _module(cls)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    gate = custom.build(_raw(bn, "g", GATE_EXPR))
    elu = custom.build(_raw(bn, "e", ELU_EXPR, params=ELU_PARAMS))
    with torch.inference_mode():
        assert same_bits(gate.apply(x, False, gate.parse_params({})).numpy(),
                         GateLayer(bn)(x).numpy())
        assert same_bits(elu.apply(x, False, elu.parse_params({"alpha": 0.5})).numpy(),
                         ELULayer(bn, 0.5)(x).numpy())


def test_batch_stats_uses_the_requests_own_statistics():
    bn = _module()
    x = torch.randn(32, C, generator=torch.Generator().manual_seed(2)) + 5
    gate = custom.build(_raw(bn, "g", GATE_EXPR))
    train = copy.deepcopy(bn).train()
    with torch.inference_mode():
        expected = GateLayer(train)(x)
        got = gate.apply(x, False, gate.parse_params({"batch_stats": True}))
    assert same_bits(got.numpy(), expected.numpy())
    assert not torch.equal(got, gate.apply(x, False, gate.parse_params({})))


@pytest.mark.parametrize(("bn", "words"), [
    ({"running_mean": [0.0, 1.0]}, "running_var"),
    ({"running_mean": [0.0, 1.0], "running_var": [1.0]}, "has 1 values"),
    ({"running_mean": [0.0], "running_var": [-1.0]}, ">= 0"),
    ({"running_mean": [0.0], "running_var": [1.0], "eps": 0}, "eps"),
    ({"running_mean": [float("nan")], "running_var": [1.0]}, "finite"),
    ({"running_mean": [0.0], "running_var": [1.0], "momentum": 0.1}, "unknown field"),
    ({"running_mean": [0.0] * 5000, "running_var": [1.0] * 5000}, "4096"),
])
def test_bad_statistics_are_refused(bn, words):
    with pytest.raises(InvalidRequest, match=words):
        custom.build({"name": "b", "expr": "x", "batch_norm": bn})


def test_over_http_channels_batching_and_own_statistics():
    bn = _module()
    raw = _raw(bn, "bn_gate", GATE_EXPR)
    with serve(max_delay_us=300_000, max_batch_requests=3) as srv:
        r = httpx.post(srv.url + "/v1/activations", json=raw)
        assert r.status_code == 201, r.text
        assert r.json()["batch_norm"]["channels"] == C
        assert [p["name"] for p in r.json()["params"]] == ["batch_stats"]
        xs = [np.random.default_rng(i).standard_normal((5 + i, C)).astype(np.float32) * (i + 1)
              for i in range(3)]

        async def send(batch_stats: bool):
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*[c.post(
                    "/v1/activations/bn_gate", content=x.tobytes(),
                    params={"shape": f"{x.shape[0]},{C}", "batch_stats": str(batch_stats).lower()},
                    headers={"content-type": "application/octet-stream"}) for x in xs])

        for batch_stats in (False, True):
            responses = asyncio.run(send(batch_stats))
            assert {r.headers["x-batch-size"] for r in responses} == {"3"}
            layer = GateLayer(copy.deepcopy(bn).train(batch_stats))
            for x, r in zip(xs, responses, strict=True):
                with torch.inference_mode():
                    expected = layer(torch.from_numpy(x)).numpy()
                got = np.frombuffer(r.content, np.float32).reshape(x.shape)
                assert same_bits(got, expected)
        # wrong channel count, and a 1-d input: 400 naming the shape
        for shape, data in (("5,3", [0.0] * 15), ("4", [0.0] * 4)):
            r = httpx.post(srv.url + "/v1/activations/bn_gate", content=json.dumps(
                {"data": data, "shape": [int(s) for s in shape.split(",")]}),
                headers={"content-type": "application/json"})
            assert r.status_code == 400 and f"(N, {C}, ...)" in r.json()["error"]["message"]
