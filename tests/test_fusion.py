"""Fusion (``service/engine/fusion.py``): a registered custom activation is compiled with
torch.compile in a background thread and served compiled where it pays; the catalogue says
what was chosen and why, and a compiled answer equals the compiled function applied to that
request alone, bit for bit. The other tests' servers run with fusion off (conftest)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import torch

from service.engine import custom, fusion
from service.engine.reference import reference
from service.engine.selftest import sample
from service.errors import InvalidRequest
from service.settings import Settings

from .conftest import same_bits, serve, subprocess_server

GELU_ISH = "x * sigmoid(1.702 * x)"


def test_ulps_are_counted_in_the_dtype_with_nan_and_signed_zero_rules():
    one = torch.tensor([1.0, -2.0, 0.0, float("nan"), float("inf")])
    up = torch.nextafter(one, torch.full_like(one, float("inf")))
    assert fusion.max_ulp(one, one) == 0.0
    assert fusion.max_ulp(torch.tensor([0.0]), torch.tensor([-0.0])) == 0.0
    assert fusion.max_ulp(up[:2], one[:2]) == 1.0
    three = torch.tensor([1.0]) + 3 * torch.finfo(torch.float32).eps
    assert fusion.max_ulp(three, torch.tensor([1.0])) == 3.0
    assert fusion.max_ulp(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    half = torch.tensor([1.0], dtype=torch.float16)
    assert fusion.max_ulp(half + torch.finfo(torch.float16).eps, half) == 1.0
    assert fusion.max_ulp(torch.empty(0), torch.empty(0)) == 0.0


def test_compiler_detection_follows_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "actserve-no-such-c++")
    assert fusion.cpp_compiler() == ("actserve-no-such-c++", None)
    monkeypatch.setenv("CXX", "sh")  # any program on PATH stands for the compiler
    assert fusion.cpp_compiler()[1] is not None


def test_the_product_default_is_auto_and_test_servers_run_eager(client):
    assert Settings.model_fields["fusion"].default == "auto"
    r = client.post("/v1/activations", json={"name": "fusion_off", "expr": "x * 3"})
    assert r.status_code == 201, r.text
    try:
        assert r.json()["fusion"] == {"state": "eager", "reason": fusion.OFF,
                                      "max_ulp_vs_eager": {}}
    finally:
        client.delete("/v1/activations/fusion_off")


def _post(c, name: str, x: np.ndarray):
    return c.post(f"/v1/activations/{name}", content=x.tobytes(), params={"shape": str(x.size)},
                  headers={"content-type": "application/octet-stream"})


def test_auto_on_cpu_compiles_in_the_background_and_serves_the_faster_form():
    xs = [sample(n, "float32", i) for i, n in enumerate((1, 7, 1000, 4099, 65_537))]
    with serve(fusion="auto", max_delay_us=200_000, max_batch_requests=len(xs)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        t0 = time.monotonic()
        r = c.post("/v1/activations", json={"name": "fused_gelu", "expr": GELU_ISH})
        assert r.status_code == 201, r.text
        assert time.monotonic() - t0 < 10  # compiling is not on the registration's path
        assert r.json()["fusion"]["state"] in ("pending", "compiled", "eager")
        act = srv.engine.registry.get("fused_gelu")
        entry = act.fusion.entry
        assert entry is not None and entry.ready.wait(120), "fusion did not finish in 120 s"
        described = c.get("/v1/activations/fused_gelu").json()["fusion"]
        listed = {a["name"]: a for a in c.get("/v1/activations").json()["activations"]}
        assert listed["fused_gelu"]["fusion"] == described
        assert described["state"] in ("compiled", "eager") and described["device"] == "cpu"
        ulp = described["max_ulp_vs_eager"]
        assert set(ulp) == {"float32"} and isinstance(ulp["float32"], float) and \
            0 <= ulp["float32"] <= fusion.MAX_ULP
        timings = described["cpu_timings_ms"]
        assert timings["elements"] == fusion.TIME_ELEMENTS
        assert timings["eager"] > 0 and timings["compiled"] > 0
        assert (described["state"] == "compiled") == (timings["compiled"] < timings["eager"])
        if described["state"] == "eager":
            assert "faster" in described["reason"]

        async def together():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                return await asyncio.gather(*[_post(ac, "fused_gelu", x) for x in xs])

        responses = asyncio.run(together())
        assert {r.headers["x-batch-size"] for r in responses} == {str(len(xs))}
        eager = custom.build({"name": "e", "expr": GELU_ISH})
        for x, r in zip(xs, responses, strict=True):
            assert r.status_code == 200, r.text
            got = np.frombuffer(r.content, np.float32)
            if described["state"] == "compiled":  # sizes 0 and 1 padded to 2
                with torch.inference_mode():  # the compiled function on this request alone
                    want = entry(torch.from_numpy(x.copy())).numpy()
            else:
                want = reference(eager, (), x, "float32")[0]
            assert same_bits(got, want), x.size
        # a gradient is autograd's of the eager form, whatever form serves values
        x = xs[3]
        r = c.post("/v1/activations/fused_gelu", content=x.tobytes(),
                   params={"shape": str(x.size), "outputs": "grad"},
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        leaf = torch.from_numpy(x.copy()).requires_grad_(True)
        y = eager.fn(leaf)
        (want,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        assert same_bits(np.frombuffer(r.content, np.float32), want.numpy())
        # the same expression registered again reuses the decision, at once
        assert c.post("/v1/activations", json={"name": "fused_again", "expr": GELU_ISH}
                      ).json()["fusion"] == described


def test_without_a_cpp_compiler_the_activation_stays_eager_and_says_why():
    env = {"ACTSERVE_FUSION": "auto", "CXX": "actserve-no-such-g++"}
    with subprocess_server(env) as (_, url), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/activations", json={"name": "nocc", "expr": "relu(x) * 2"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        state = r.json()["fusion"]
        while state["state"] == "pending":  # decided at once: nothing to compile
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
            state = c.get("/v1/activations/nocc").json()["fusion"]
        assert state["state"] == "eager"
        assert "no C++ compiler" in state["reason"] and "actserve-no-such-g++" in state["reason"]
        x = np.array([-1.5, 0.0, 2.0], np.float32)
        assert np.frombuffer(_post(c, "nocc", x).content, np.float32).tolist() == [0.0, 0.0, 4.0]


def test_in_place_stays_refused_for_custom_activations():
    act = custom.build({"name": "g", "expr": GELU_ISH})
    with pytest.raises(InvalidRequest, match="no in-place form"):
        act.apply(torch.ones(4), True, ())
