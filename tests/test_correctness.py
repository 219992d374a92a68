"""Batch invariance, bit for bit: for every activation x dtype x in-place x amp that CPU
supports, the server's answer equals the reference applied to that request alone, also
when the request shared a batch with requests of other sizes."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import dtypes

from .conftest import REGISTRY, reference, same_bits
from .gates import held

WIRES = list(dtypes.NAMES)
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -1e-45, 5e-324, 65504.0, 1e30,
           -1e30, 3.0, -3.0, 20.0, -20.0]
AMP_MODES = [(False, None), (True, None), (True, "float16"), (True, "bfloat16")]


def _values(rng: np.random.Generator, n: int, wire: str) -> np.ndarray:
    v = rng.standard_normal(n) * rng.choice([0.5, 4.0, 30.0])
    k = min(n, len(SPECIAL))
    if k:
        v[rng.choice(n, size=k, replace=False)] = SPECIAL[:k]
    return dtypes.from_float(v, wire)


@st.composite
def request_spec(draw, max_size=100_000):
    name = draw(st.sampled_from(REGISTRY.names()))
    act = REGISTRY.get(name)
    wire = draw(st.sampled_from(WIRES))
    compute = draw(st.sampled_from([None, *WIRES]))
    amp, amp_dtype = draw(st.sampled_from(AMP_MODES))
    inplace = draw(st.booleans()) if act.supports_inplace else False
    ndim = draw(st.integers(0, 3))
    if ndim == 0:
        shape = ()
    else:
        total = draw(st.sampled_from([0, 1, 3, 17, 255, 1024, 4099, 33_333, max_size]))
        shape = (total,) if ndim == 1 else (1,) * (ndim - 1) + (total,)
        if ndim >= 2 and total % 3 == 0 and total:
            shape = (3, *shape[1:-1], total // 3)
    params = {}
    if name == "leaky_relu":
        params["negative_slope"] = draw(st.sampled_from([0.01, 0.2, -0.5]))
    if name == "gelu":
        params["approximate"] = draw(st.sampled_from(["none", "tanh"]))
    if name in ("elu", "celu"):
        params["alpha"] = draw(st.sampled_from([1.0, 0.5, 2.0]))
    if name == "hardtanh":
        params.update(min_val=-0.5, max_val=2.0)
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(name=name, wire=wire, compute=compute, amp=amp, amp_dtype=amp_dtype,
                inplace=inplace, shape=shape, params=params, seed=seed)


def _binary_request(spec: dict, values: np.ndarray):
    query = {"shape": ",".join(map(str, spec["shape"])), "dtype": spec["wire"],
             "amp": str(spec["amp"]).lower(), "inplace": str(spec["inplace"]).lower(),
             **{k: str(v) for k, v in spec["params"].items()}}
    if spec["compute"]:
        query["compute_dtype"] = spec["compute"]
    if spec["amp_dtype"]:
        query["amp_dtype"] = spec["amp_dtype"]
    return dict(url=f"/v1/activations/{spec['name']}", params=query, content=values.tobytes(),
                headers={"content-type": "application/octet-stream"})


async def _send_all(url: str, requests: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post(**r) for r in requests))


def _check_binary(spec: dict, values: np.ndarray, resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    expected, out_dtype = reference(
        spec["name"], values.reshape(spec["shape"]), spec["wire"], params=spec["params"],
        compute_dtype=spec["compute"], amp=spec["amp"], amp_dtype=spec["amp_dtype"],
        inplace=spec["inplace"])
    assert resp.headers["x-dtype"] == out_dtype
    assert resp.headers["x-shape"] == ",".join(map(str, spec["shape"]))
    got = np.frombuffer(resp.content, dtype=dtypes.STORAGE[out_dtype]).reshape(spec["shape"])
    assert same_bits(got, expected), f"{spec} differs from the reference"


def check_concurrent(url: str, specs: list[dict]) -> None:
    """Send every spec's request at once; each answer equals its lone reference."""
    values = [_values(np.random.default_rng(s["seed"]), int(np.prod(s["shape"])), s["wire"])
              for s in specs]
    requests = [_binary_request(s, v) for s, v in zip(specs, values, strict=True)]
    responses = asyncio.run(_send_all(url, requests))
    for s, v, r in zip(specs, values, responses, strict=True):
        _check_binary(s, v, r)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(request_spec(), min_size=1, max_size=8))
def test_concurrent_requests_equal_reference_bit_for_bit(server, specs):
    check_concurrent(server.url, specs)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=request_spec(), sizes=st.lists(st.integers(0, 100_000), min_size=2, max_size=6))
def test_shared_batch_of_mixed_sizes_is_bit_exact(server, spec, sizes):
    """Requests of one batch key but different sizes are held until all are queued, so they
    share one batch; each equals its lone reference."""
    specs = [{**spec, "shape": (n,), "seed": spec["seed"] + i} for i, n in enumerate(sizes)]
    values = [_values(np.random.default_rng(s["seed"]), n, s["wire"])
              for s, n in zip(specs, sizes, strict=True)]
    requests = [_binary_request(s, v) for s, v in zip(specs, values, strict=True)]

    async def run():
        async with held(server.engine, len(requests)):
            tasks = [asyncio.ensure_future(_send_all(server.url, [r])) for r in requests]
        return [(await t)[0] for t in tasks]

    responses = asyncio.run(run())
    for s, v, r in zip(specs, values, responses, strict=True):
        _check_binary(s, v, r)
    # one batch was dispatched before the executor was held; everything else shared one
    batches = {(r.headers["x-batch-size"], r.headers["x-batch-elements"]) for r in responses}
    assert len(batches) <= 2
    assert max(int(b[0]) for b in batches) >= (len(requests) + 1) // 2


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("name", REGISTRY.names())
def test_json_round_trip_is_exact(app_client, name, wire):
    """JSON carries every value exactly (shortest round-trip repr; NaN/Infinity tokens)."""
    values = _values(np.random.default_rng(7), 300, wire).reshape(3, 100)
    sent = dtypes.to_float(values, wire).tolist()
    r = app_client.post(f"/v1/activations/{name}",  # json.dumps writes the NaN/Infinity tokens
                    content=json.dumps({"data": sent, "dtype": wire}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    server_wire = dtypes.from_float(np.asarray(sent, dtype=np.float64), wire)
    expected, out_dtype = reference(name, server_wire, wire)
    assert body["dtype"] == out_dtype and body["shape"] == [3, 100]
    got = dtypes.from_float(np.asarray(body["data"], dtype=np.float64), out_dtype)
    exp_f, got_f = dtypes.to_float(expected, out_dtype), dtypes.to_float(got, out_dtype)
    both_nan = np.isnan(exp_f) & np.isnan(got_f)
    assert np.array_equal(np.signbit(exp_f[~both_nan]), np.signbit(got_f[~both_nan]))
    assert np.array_equal(exp_f[~both_nan], got_f[~both_nan])
    assert np.array_equal(np.isnan(exp_f), np.isnan(got_f))
