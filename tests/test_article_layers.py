"""The article's two layers, written exactly as the article writes them (``nn.BatchNorm1d(4)``
then ``nn.ReLU()`` / ``nn.ELU()``), with trained running statistics, in ``eval()``: the same
parameters registered as batch-norm layers on a real server give ``module(x)`` bit for bit,
for ``(N, 4)`` and ``(N, 4, L)`` float32 inputs, alone and when requests share a batch."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from service.engine import custom
from service.engine.selftest import SPECIALS
from service.errors import InvalidRequest
from tests.conftest import same_bits, serve


class CustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.bn(x)
        return self.relu(x)


class CustomELULayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.elu = nn.ELU()

    def forward(self, x):
        x = self.bn(x)
        return self.elu(x)


# nn.ELU() is F.elu: `x if x > 0 else expm1(x)` differs from it in the kernel's scalar tail
EXPRS = {"bn_relu": (CustomLayer, "relu(x)"), "bn_elu": (CustomELULayer, "elu(x)")}


def _trained(cls: type[nn.Module], seed: int) -> nn.Module:
    """Non-trivial weight and bias, and running statistics from a few training passes."""
    torch.manual_seed(seed)
    layer = cls()
    with torch.no_grad():
        layer.bn.weight.copy_(torch.randn(4) * 2)
        layer.bn.bias.copy_(torch.randn(4))
        layer.train()
        for _ in range(5):
            layer(torch.randn(16, 4) * torch.tensor([0.5, 2.0, 3.0, 1.0]) + torch.tensor(
                [1.0, -2.0, 0.3, 4.0]))
    assert not torch.equal(layer.bn.running_mean, torch.zeros(4))
    assert not torch.equal(layer.bn.running_var, torch.ones(4))
    return layer.eval()


def _registration(name: str, layer: nn.Module, expr: str, key: str = "batch_norm") -> dict:
    bn = layer.bn
    return {"name": name, "expr": expr, key: {
        "running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist(),
        "weight": bn.weight.tolist(), "bias": bn.bias.tolist(), "eps": bn.eps}}


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) * 3 for n in (1, 5, 64, 257)]
    xs += [rng.standard_normal((n, 4, length)).astype(np.float32) * 3
           for n, length in ((2, 7), (3, 33), (8, 129))]
    special = np.array(SPECIALS + [0.5] * (20 - len(SPECIALS)), np.float32).reshape(5, 4)
    return [*xs, special]


def _post(client: httpx.Client | httpx.AsyncClient, name: str, x: np.ndarray):
    return client.post(f"/v1/activations/{name}", content=x.tobytes(),
                       params={"shape": ",".join(map(str, x.shape))},
                       headers={"content-type": "application/octet-stream"})


def _answer(r: httpx.Response, x: np.ndarray) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.float32).reshape(x.shape)


def test_both_spellings_build_the_same_layer_and_not_both_at_once():
    layer = _trained(CustomLayer, 0)
    a = custom.build(_registration("a", layer, "relu(x)", "batch_norm"))
    b = custom.build(_registration("a", layer, "relu(x)", "batchnorm"))
    assert a.batch_norm == b.batch_norm and a.describe() == b.describe()
    both = {**_registration("a", layer, "relu(x)"), "batchnorm": {"running_mean": [0.0],
                                                                 "running_var": [1.0]}}
    with pytest.raises(InvalidRequest, match="not both"):
        custom.build(both)


def test_the_articles_layers_served_bit_for_bit_alone_and_batched():
    layers = {name: _trained(cls, seed) for seed, (name, (cls, _)) in enumerate(EXPRS.items())}
    xs = _inputs()
    with torch.inference_mode():
        expected = {name: [layer(torch.from_numpy(x)).numpy() for x in xs]
                    for name, layer in layers.items()}
    with serve(max_delay_us=300_000, max_batch_requests=len(xs)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i, (name, (_, expr)) in enumerate(EXPRS.items()):
                key = ("batch_norm", "batchnorm")[i % 2]  # the spelling works too
                r = c.post("/v1/activations", json=_registration(name, layers[name], expr, key))
                assert r.status_code == 201, r.text
                assert r.json()["batch_norm"]["running_mean"] == \
                    layers[name].bn.running_mean.tolist()
            for name in EXPRS:  # alone
                for x, want in zip(xs, expected[name], strict=True):
                    r = _post(c, name, x)
                    assert r.headers["x-batch-size"] == "1"
                    assert same_bits(_answer(r, x), want), (name, x.shape)

        async def together(name: str) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                return await asyncio.gather(*[_post(ac, name, x) for x in xs])

        for name in EXPRS:  # all the shapes in one batch
            responses = asyncio.run(together(name))
            assert {r.headers["x-batch-size"] for r in responses} == {str(len(xs))}
            for x, r, want in zip(xs, responses, expected[name], strict=True):
                assert same_bits(_answer(r, x), want), (name, x.shape)
