"""Inline expressions (``/v1/activations/expr``, v2 model ``expr``): the request's own
``expr``, checked before its first request, cached by normalized form, batched with
requests of the same expression only, bit for bit the composition applied alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from service.engine import custom
from service.engine.inline import ExpressionCache
from service.engine.reference import reference
from service.engine.selftest import sample
from service.errors import InvalidRequest
from tests.conftest import same_bits, serve

BIN = {"content-type": "application/octet-stream"}


def _lone(text: str, x: np.ndarray) -> np.ndarray:
    act = custom.build({"name": "lone", "expr": text})
    return reference(act, (), x, "float32")[0]


@pytest.fixture(scope="module")
def srv():
    with serve(max_delay_us=300_000, max_batch_requests=8) as s:
        yield s


def _post(c, text: str, x: np.ndarray):
    return c.post("/v1/activations/expr", params={"shape": str(x.size), "expr": text},
                  content=x.tobytes(), headers=BIN)


def test_inline_equals_the_lone_composition(srv):
    x = sample(4099, "float32", 7)
    for text in ("relu(x) * sigmoid(x)", "x if x > 0 else 0.5 * (exp(x) - 1)",
                 "tanh(softplus(x)) * x", "clamp(x, -1, 1) ** 2"):
        r = httpx.post(srv.url + "/v1/activations/expr", content=x.tobytes(), headers=BIN,
                       params={"shape": str(x.size), "expr": text})
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(text, x))
    # JSON and v2 carry it too
    r = httpx.post(srv.url + "/v1/activations/expr",
                   json={"data": [-2.0, 3.0], "expr": "x * x - 1"})
    assert r.status_code == 200 and r.json()["data"] == [3.0, 8.0]
    assert r.json()["activation"] == "expr:((x * x) - 1.0)"
    body = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1, 2]}],
            "parameters": {"expr": "x * 3"}}
    r = httpx.post(srv.url + "/v2/models/expr/infer", content=json.dumps(body))
    assert r.status_code == 200 and r.json()["model_name"] == "expr"
    assert r.json()["outputs"][0]["data"] == [3.0, 6.0]
    stats = httpx.get(srv.url + "/v2/models/expr/stats").json()["model_stats"][0]
    assert stats["name"] == "expr" and stats["inference_stats"]["success"]["count"] >= 1


def test_same_expression_batches_different_ones_do_not(srv):
    x = [sample(100 + i, "float32", i) for i in range(6)]
    texts = ["x * sigmoid(x)", " x*sigmoid( x )", "x * sigmoid(x)",
             "x * tanh(x)", "x*tanh(x)", "x * tanh(x)"]
    # warm both expressions (their checks) so the six requests queue together
    with httpx.Client(base_url=srv.url) as c:
        for t in texts[::3]:
            assert _post(c, t, x[0]).status_code == 200

    async def send():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*[_post(c, t, v) for t, v in zip(texts, x, strict=True)])

    responses = asyncio.run(send())
    assert {r.headers["x-batch-size"] for r in responses} == {"3"}
    for t, v, r in zip(texts, x, responses, strict=True):
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(t, v))


@pytest.mark.parametrize(("body", "words"), [
    ({"data": [1.0]}, "send the expression"),
    ({"data": [1.0], "expr": "__import__('os')"}, "allowed"),
    ({"data": [1.0], "expr": "x * alpha"}, "unknown name 'alpha'"),
    ({"data": [1.0], "expr": 5}, "must be a string"),
    ({"data": [1.0], "expr": "x", "inplace": True}, "in-place"),
])
def test_bad_inline_requests_are_400(srv, body, words):
    r = httpx.post(srv.url + "/v1/activations/expr", json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_expr_on_another_activation_is_400(srv):
    r = httpx.post(srv.url + "/v1/activations/relu", json={"data": [1.0], "expr": "x"})
    assert r.status_code == 400 and "'expr' activation" in r.json()["error"]["message"]


def test_cache_is_bounded_and_keyed_by_normalized_form():
    async def ok(act):
        return None

    cache = ExpressionCache(ok, max_entries=4)
    a = cache.resolve("x*2")
    assert cache.resolve(" x * 2 ") is a and cache.resolve("(x)*(2.0)") is a
    assert (cache.hits, cache.misses) == (2, 1)
    for i in range(10):
        cache.resolve(f"x + {i}")
    assert len(cache) == 4
    assert cache.resolve("x*2") is not a  # evicted, rebuilt
    with pytest.raises(InvalidRequest):
        cache.resolve("x +")


def test_a_failed_check_is_a_400_and_remembered():
    calls = []

    async def failing(act):
        calls.append(act.name)
        return "batched result differs for size 7"

    async def run():
        cache = ExpressionCache(failing)
        act = cache.resolve("x * 2")
        for _ in range(2):
            with pytest.raises(InvalidRequest, match="failed its self-test"):
                await cache.prepare(act)

    asyncio.run(run())
    assert calls == ["expr:(x * 2.0)"]


def test_no_live_executor_means_503_not_an_untested_activation():
    from service.engine.engine import Engine
    from service.errors import NotReady
    from service.settings import Settings

    engine = Engine(Settings())  # never started: no compute thread is alive
    act = custom.build({"name": "lonely", "expr": "x * 2"})
    with pytest.raises(NotReady):
        asyncio.run(engine.register(act))
    assert "lonely" not in engine.registry
