"""Gradients (docs/lab.md): the derivative and vector-Jacobian products equal
``torch.autograd.grad`` for that request alone, bit for bit, for every activation x dtype x
compute dtype x AMP setting, alone and in shared batches, over the native JSON, native
binary and v2 wire formats."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import dtypes
from service.engine.compute import NAMES, TORCH_DTYPES, tensor_storage, wire_tensor

from .conftest import REGISTRY, same_bits
from .gates import held
from .test_correctness import _values, request_spec


def autograd(name: str, values: np.ndarray, wire: str, params: dict, compute: str | None,
             amp: bool, amp_dtype: str | None, upstream: np.ndarray | None):
    """The test's own reference: the activation's torch function under the request's mode,
    differentiated with ``torch.autograd.grad`` with respect to the input as sent."""
    act = REGISTRY.get(name)
    kwargs = dict(act.parse_params(params))
    x = wire_tensor(np.array(values, copy=True), wire).requires_grad_(True)
    xc = x.to(TORCH_DTYPES[compute]) if compute else x
    if amp:
        dt = TORCH_DTYPES[amp_dtype] if amp_dtype else torch.bfloat16
        with torch.autocast("cpu", dtype=dt):
            y = act.fn(xc, **kwargs)
    else:
        y = act.fn(xc, **kwargs)
    if upstream is None:
        g = torch.ones_like(y)
    else:
        g = wire_tensor(np.array(upstream, copy=True), wire).to(y.dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    return _storage(y.detach()), _storage(grad)


def _storage(t: torch.Tensor) -> tuple[np.ndarray, str]:
    return tensor_storage(t.contiguous()), NAMES[t.dtype]


def binary_request(spec: dict, values: np.ndarray, upstream: np.ndarray | None,
                   outputs: str = "value,grad") -> dict:
    query = {"shape": ",".join(map(str, spec["shape"])), "dtype": spec["wire"],
             "amp": str(spec["amp"]).lower(), "outputs": outputs,
             **{k: str(v) for k, v in spec["params"].items()}}
    if spec["compute"]:
        query["compute_dtype"] = spec["compute"]
    if spec["amp_dtype"]:
        query["amp_dtype"] = spec["amp_dtype"]
    body = values.tobytes()
    if upstream is not None:
        query["grad_output"] = "true"
        body += upstream.tobytes()
    return dict(url=f"/v1/activations/{spec['name']}", params=query, content=body,
                headers={"content-type": "application/octet-stream"})


def split_parts(resp: httpx.Response) -> dict[str, np.ndarray]:
    """The parts of a native binary lab answer, by name, decoded per X-Output-Dtypes."""
    names = resp.headers["x-outputs"].split(",")
    kinds = resp.headers["x-output-dtypes"].split(",")
    sizes = [int(n) for n in resp.headers["x-output-bytes"].split(",")]
    assert sum(sizes) == len(resp.content)
    shape = [int(d) for d in resp.headers["x-shape"].split(",") if d]
    out, at = {}, 0
    for name, kind, size in zip(names, kinds, sizes, strict=True):
        raw = resp.content[at:at + size]
        at += size
        out[name] = json.loads(raw) if kind == "json" else \
            np.frombuffer(raw, dtype=dtypes.STORAGE[kind]).reshape(shape)
    return out


def check(spec: dict, values: np.ndarray, upstream: np.ndarray | None,
          resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    (value, vdtype), (grad, gdtype) = autograd(
        spec["name"], values.reshape(spec["shape"]), spec["wire"], spec["params"],
        spec["compute"], spec["amp"], spec["amp_dtype"],
        None if upstream is None else upstream.reshape(spec["shape"]))
    assert resp.headers["x-output-dtypes"] == f"{vdtype},{gdtype}"
    parts = split_parts(resp)
    assert same_bits(parts["value"], value), f"{spec}: value differs"
    assert same_bits(parts["grad"], grad), f"{spec}: gradient differs from autograd"


async def _send(url: str, requests: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post(**r) for r in requests))


def _grad_spec(spec: dict) -> dict:
    return {**spec, "inplace": False, "shape": spec["shape"] if np.prod(spec["shape"]) <= 20_000
            else (4099,)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(request_spec(max_size=20_000), min_size=1, max_size=6),
       vjp=st.booleans())
def test_gradients_equal_autograd_bit_for_bit(server, specs, vjp):
    specs = [_grad_spec(s) for s in specs]
    values = [_values(np.random.default_rng(s["seed"]), int(np.prod(s["shape"])), s["wire"])
              for s in specs]
    ups = [_values(np.random.default_rng(s["seed"] + 1), int(np.prod(s["shape"])), s["wire"])
           if vjp else None for s in specs]
    reqs = [binary_request(s, v, u) for s, v, u in zip(specs, values, ups, strict=True)]
    for s, v, u, r in zip(specs, values, ups, asyncio.run(_send(server.url, reqs)), strict=True):
        check(s, v, u, r)


@pytest.mark.parametrize("name", REGISTRY.names())
@pytest.mark.parametrize("wire", list(dtypes.NAMES))
def test_every_activation_and_dtype_in_a_shared_batch(server, name, wire):
    """Gradient and value requests of one activation, held until all are queued so they
    share one batch: each gradient equals autograd alone, each value the lone value."""
    base = dict(name=name, wire=wire, compute=None, amp=False, amp_dtype=None,
                inplace=False, params={}, seed=7)
    sizes = [0, 1, 63, 1000, 4099]
    specs = [{**base, "shape": (n,), "seed": 7 + i} for i, n in enumerate(sizes)]
    values = [_values(np.random.default_rng(s["seed"]), n, wire) for s, n in zip(specs, sizes,
                                                                                 strict=True)]
    ups = [_values(np.random.default_rng(s["seed"] + 99), n, wire) if i % 2 else None
           for i, (s, n) in enumerate(zip(specs, sizes, strict=True))]
    reqs = [binary_request(s, v, u) for s, v, u in zip(specs, values, ups, strict=True)]

    async def run():
        async with held(server.engine, len(reqs)):
            tasks = [asyncio.ensure_future(_send(server.url, [r])) for r in reqs]
        return [(await t)[0] for t in tasks]

    responses = asyncio.run(run())
    for s, v, u, r in zip(specs, values, ups, responses, strict=True):
        check(s, v, u, r)
    assert max(int(r.headers["x-batch-size"]) for r in responses) >= 2


def test_json_grad_only_and_vjp(app_client):
    x = [-2.0, -0.5, 0.0, 0.5, 3.0]
    g = [1.0, 2.0, -1.0, 0.5, 4.0]
    r = app_client.post("/v1/activations/leaky_relu", json={
        "data": x, "outputs": ["grad"], "grad_output": g, "params": {"negative_slope": 0.2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "data" not in body and body["grad_dtype"] == "float32"
    assert body["grad"] == [0.2 * 1.0, 0.2 * 2.0, 0.2 * -1.0, 0.5, 4.0] or \
        np.allclose(body["grad"], [0.2, 0.4, -0.2, 0.5, 4.0])
    (_, _), (ref, _) = autograd("leaky_relu", np.array(x, np.float32), "float32",
                                {"negative_slope": 0.2}, None, False, None,
                                np.array(g, np.float32))
    assert np.array_equal(np.array(body["grad"], np.float32), ref)


def test_v2_outputs_output_and_grad(app_client):
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    g = np.arange(7, dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [7], "datatype": "FP32", "data": x.tolist()},
                       {"name": "grad_output", "shape": [7], "datatype": "FP32",
                        "data": g.tolist()}],
            "outputs": [{"name": "grad"}, {"name": "output"}],
            "parameters": {"alpha": 0.7}}
    r = app_client.post("/v2/models/elu/infer", json=body)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert [o["name"] for o in r.json()["outputs"]] == ["output", "grad"]
    (value, _), (grad, _) = autograd("elu", x, "float32", {"alpha": 0.7}, None, False, None, g)
    assert np.array_equal(np.array(outs["output"]["data"], np.float32), value)
    assert np.array_equal(np.array(outs["grad"]["data"], np.float32), grad)
    # binary: both tensors after the JSON header, in order
    head = json.dumps({"inputs": [
        {"name": "input", "shape": [7], "datatype": "FP32",
         "parameters": {"binary_data_size": 28}},
        {"name": "grad_output", "shape": [7], "datatype": "FP32",
         "parameters": {"binary_data_size": 28}}],
        "outputs": [{"name": "grad", "parameters": {"binary_data": True}}],
        "parameters": {"alpha": 0.7}}).encode()
    r = app_client.post("/v2/models/elu/infer", content=head + x.tobytes() + g.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head)),
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert [o["name"] for o in meta["outputs"]] == ["grad"]
    assert np.array_equal(np.frombuffer(r.content[n:], np.float32), grad)


@pytest.mark.parametrize(("body", "needle"), [
    ({"data": [1.0], "outputs": ["grad"], "inplace": True}, "overwrites the input"),
    ({"data": [1.0], "outputs": ["hessian"]}, "unknown outputs"),
    ({"data": [1.0, 2.0], "grad_output": [1.0, 1.0]}, "ask for it with outputs"),
    ({"data": [1.0, 2.0], "outputs": ["grad"], "grad_output": [1.0]}, "grad_output"),
    ({"data": [1.0], "outputs": "value,,"}, None),
    ({"data": [1.0], "report": ["everything"]}, "unknown report"),
])
def test_bad_gradient_requests_are_400(app_client, body, needle):
    r = app_client.post("/v1/activations/relu", json=body)
    if needle is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_v2_grad_output_must_match_the_input(app_client):
    body = {"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                       {"name": "grad_output", "shape": [3], "datatype": "FP32",
                        "data": [1, 2, 3]}],
            "outputs": [{"name": "grad"}]}
    r = app_client.post("/v2/models/relu/infer", json=body)
    assert r.status_code == 400 and "grad_output" in r.json()["error"]
    body["inputs"][1]["name"] = "other"
    assert app_client.post("/v2/models/relu/infer", json=body).status_code == 400


def test_custom_and_inline_activations_have_gradients(server):
    """A registered composition with a param and an inline expression: their gradients
    equal autograd of the hand-written torch composition, bit for bit."""
    from actserve_client import Client

    x = _values(np.random.default_rng(5), 3000, "float32")
    g = _values(np.random.default_rng(6), 3000, "float32")

    def by_hand(fn):
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y = fn(xt)
        (grad,) = torch.autograd.grad(y, xt, torch.from_numpy(g.copy()))
        return y.detach().numpy(), grad.numpy()

    with Client(server.url) as client:
        client.register("grad_gate", "x * sigmoid(k * x)", k={"default": 1.702})
        try:
            ans = client.activate("grad_gate", x, grad_output=g, k=1.5)
            value, grad = by_hand(lambda t: t * torch.sigmoid(1.5 * t))
            assert same_bits(ans.value, value) and same_bits(ans.grad, grad)
        finally:
            client.unregister("grad_gate")
        ans = client.activate("expr", x, expr="relu(x) * tanh(x)", outputs="grad",
                              grad_output=g)
        assert ans.value is None
        assert same_bits(ans.grad, by_hand(lambda t: torch.relu(t) * torch.tanh(t))[1])
        rep = client.activate("expr", x, expr="relu(x) * tanh(x)", report="numerics").report
        assert rep["numerics"]["dtype"] == "float32" and rep["numerics"]["elements"] == 3000


def test_engine_process_serves_gradients_and_reports():
    """--engine process: the gradient, the upstream gradient and the answer travel through
    the shared-memory slots; a shared batch of gradient and value requests is exact, and the
    reports (numerics, profile with its trace) come back from the engine process."""
    from .conftest import serve

    specs = [dict(name=n, wire=w, compute=c, amp=False, amp_dtype=None, inplace=False,
                  params={}, shape=(n_el,), seed=i)
             for i, (n, w, c, n_el) in enumerate([
                 ("gelu", "float32", None, 4099), ("silu", "float16", None, 1),
                 ("elu", "bfloat16", "float32", 1000), ("tanh", "float32", "float16", 333),
                 ("relu", "float64", None, 0)])]
    values = [_values(np.random.default_rng(s["seed"]), s["shape"][0], s["wire"])
              for s in specs]
    ups = [_values(np.random.default_rng(s["seed"] + 5), s["shape"][0], s["wire"])
           if i % 2 == 0 else None for i, s in enumerate(specs)]
    reqs = [binary_request(s, v, u) for s, v, u in zip(specs, values, ups, strict=True)]
    plain = {**specs[0]}
    reqs.append(binary_request(plain, values[0], None, outputs="value"))
    with serve(engine="process", allow_profile=True, max_delay_us=200_000) as srv:
        responses = asyncio.run(_send(srv.url, reqs))
        for s, v, u, r in zip(specs, values, ups, responses[:-1], strict=True):
            check(s, v, u, r)
        assert responses[-1].status_code == 200
        assert responses[-1].content == split_parts(responses[0])["value"].tobytes()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/activations/sigmoid", json={"data": [0.5, -2.0],
                                                        "report": ["numerics", "profile"]})
            assert r.status_code == 200, r.text
            rep = r.json()["report"]
            assert rep["numerics"]["elements"] == 2
            assert any(row["name"] == "aten::sigmoid" for row in rep["profile"]["operators"])
            assert "traceEvents" in c.get(rep["profile"]["trace_url"]).json()
            assert c.get("/v1/activations/relu/accuracy").status_code == 400


def test_grpc_tritonclient_asks_for_output_grad_and_a_report():
    """Stock tritonclient.grpc: inputs 'input' and 'grad_output', requested outputs
    'output' and 'grad', parameter report=numerics."""
    import tritonclient.grpc as tg

    from loadtest.servers import free_port

    from .conftest import serve

    port = free_port()
    x = _values(np.random.default_rng(8), 1000, "float16")
    g = _values(np.random.default_rng(9), 1000, "float16")
    with serve(grpc_port=port), tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
        inputs = [tg.InferInput("input", [1000], "FP16"), tg.InferInput("grad_output", [1000],
                                                                         "FP16")]
        inputs[0].set_data_from_numpy(x.view(np.float16))
        inputs[1].set_data_from_numpy(g.view(np.float16))
        outs = [tg.InferRequestedOutput("grad"), tg.InferRequestedOutput("output")]
        res = c.infer("silu", inputs, outputs=outs, parameters={"report": "numerics"})
        (value, _), (grad, _) = autograd("silu", x, "float16", {}, None, False, None, g)
        assert same_bits(res.as_numpy("output"), value.view(np.float16))
        assert same_bits(res.as_numpy("grad"), grad.view(np.float16))
        rep = json.loads(res.get_response().parameters["report_numerics"].string_param)
        assert rep["dtype"] == "float16" and rep["elements"] == 1000
        with pytest.raises(tg.InferenceServerException, match="grad_output"):
            bad = tg.InferInput("grad_output", [3], "FP16")
            bad.set_data_from_numpy(np.zeros(3, np.float16))
            c.infer("silu", [inputs[0], bad], outputs=outs)


AMP_SETTINGS = [(False, None), (True, None), (True, "float16"), (True, "bfloat16")]


def test_every_activation_dtype_and_amp_setting(server):
    """One vector-Jacobian product request per activation x input dtype x AMP setting (with
    special values), all sent at once: each equals autograd alone, bit for bit."""
    specs = [dict(name=name, wire=wire, compute=None, amp=amp, amp_dtype=amp_dtype,
                  inplace=False, params={}, shape=(257,), seed=11 + i)
             for i, (name, wire, (amp, amp_dtype)) in enumerate(
                 (n, w, a) for n in REGISTRY.names() for w in dtypes.NAMES for a in AMP_SETTINGS)]
    values = [_values(np.random.default_rng(s["seed"]), 257, s["wire"]) for s in specs]
    ups = [_values(np.random.default_rng(s["seed"] + 1), 257, s["wire"]) for s in specs]
    reqs = [binary_request(s, v, u) for s, v, u in zip(specs, values, ups, strict=True)]
    responses = asyncio.run(_send(server.url, reqs))
    for s, v, u, r in zip(specs, values, ups, responses, strict=True):
        check(s, v, u, r)


def test_async_client_asks_for_gradients_and_reports(server):
    from actserve_client import Answer, AsyncClient

    x = np.array([-2.0, 0.5, 3.0], np.float32)

    async def run():
        async with AsyncClient(server.url) as ac:
            return await ac.activate("sigmoid", x, outputs="grad", report="numerics")

    ans = asyncio.run(run())
    assert isinstance(ans, Answer) and ans.value is None
    (_, _), (grad, _) = autograd("sigmoid", x, "float32", {}, None, False, None, None)
    assert same_bits(ans.grad, grad)
    assert ans.report["numerics"]["elements"] == 3
