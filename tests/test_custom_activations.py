"""Custom activations over HTTP: registered by POST, from a TOML file at start-up; served
natively and as v2 models, batched, bit for bit the same composition applied alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine import custom
from service.engine.job import Mode
from service.engine.reference import reference
from service.engine.selftest import sample
from tests.conftest import same_bits, serve

ELU = {"name": "my_elu", "expr": "x if x > 0 else alpha * (exp(x) - 1)",
       "params": {"alpha": {"default": 1.0, "min": 0, "max": 10, "doc": "negative scale"}}}
JSON = {"content-type": "application/json"}
GATE = {"name": "gate", "expr": "relu(x) * sigmoid(x)"}


def _lone(raw: dict, x: np.ndarray, wire: str = "float32", params: dict | None = None,
          mode: Mode = Mode(None, False, None, False)) -> np.ndarray:
    act = custom.build(raw)
    return reference(act, act.parse_params(params or {}), x, wire, mode)[0]


@pytest.fixture(scope="module")
def srv():
    with serve(max_delay_us=300_000, max_batch_requests=4) as s:
        yield s


@pytest.fixture(scope="module")
def registered(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for raw in (ELU, GATE):
            r = c.post("/v1/activations", json=raw)
            assert r.status_code == 201, r.text
    return srv


def test_registration_answers_the_catalogue_entry(srv):
    raw = {"name": "sq", "expr": "x*x + b", "params": {"b": 0.5}}
    r = httpx.post(srv.url + "/v1/activations", json=raw)
    assert r.status_code == 201
    entry = r.json()
    assert entry["custom"] is True and entry["formula"] == "((x * x) + b)"
    assert entry["params"][0]["name"] == "b" and entry["params"][0]["default"] == 0.5
    assert entry["inplace"] is False
    listed = {a["name"]: a for a in httpx.get(srv.url + "/v1/activations").json()["activations"]}
    assert listed["sq"] == entry
    meta = httpx.get(srv.url + "/v2/models/sq")
    assert meta.status_code == 200 and meta.json()["name"] == "sq"
    assert httpx.get(srv.url + "/v2/models/sq/ready").status_code == 200
    # a second registration of the name, or a built-in name, is a conflict
    assert httpx.post(srv.url + "/v1/activations", json=raw).status_code == 409
    r = httpx.post(srv.url + "/v1/activations", json={"name": "relu", "expr": "x"})
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"


def test_native_answers_equal_the_lone_composition(registered):
    x = sample(4099, "float32", 3)
    for raw, params in ((ELU, {}), (ELU, {"alpha": 0.25}), (GATE, {})):
        q = "&".join([f"shape={x.size}", *(f"{k}={v}" for k, v in params.items())])
        r = httpx.post(f"{registered.url}/v1/activations/{raw['name']}?{q}", content=x.tobytes(),
                       headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(raw, x, params=params))
    # JSON, float16 wire, float64 compute
    h = sample(100, "float16", 4)
    r = httpx.post(registered.url + "/v1/activations/my_elu", headers=JSON,
                   content=json.dumps({"data": h.astype(np.float64).tolist(), "dtype": "float16",
                                       "compute_dtype": "float64", "params": {"alpha": 2}}))
    assert r.status_code == 200 and json.loads(r.text)["dtype"] == "float64"
    expected = _lone(ELU, h, "float16", {"alpha": 2}, Mode("float64", False, None, False))
    assert same_bits(np.array(json.loads(r.text)["data"], np.float64), expected)


def test_v2_infer_on_a_custom_model(registered):
    x = sample(257, "float32", 5)
    body = {"inputs": [{"name": "input", "shape": [257], "datatype": "FP32",
                        "data": x.astype(np.float64).tolist()}],
            "parameters": {"alpha": 0.5}}
    r = httpx.post(registered.url + "/v2/models/my_elu/infer", content=json.dumps(body),
                   headers=JSON)
    assert r.status_code == 200, r.text
    got = np.array(json.loads(r.text)["outputs"][0]["data"], np.float32)
    assert same_bits(got, _lone(ELU, x, params={"alpha": 0.5}))


def test_same_expression_batches_together(registered):
    xs = [sample(1000 + i, "float32", 10 + i) for i in range(4)]

    async def send():
        async with httpx.AsyncClient(base_url=registered.url, timeout=60) as c:
            return await asyncio.gather(*[
                c.post(f"/v1/activations/gate?shape={x.size}", content=x.tobytes(),
                       headers={"content-type": "application/octet-stream"}) for x in xs])

    responses = asyncio.run(send())
    assert {r.headers["x-batch-size"] for r in responses} == {"4"}
    for x, r in zip(xs, responses, strict=True):
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(GATE, x))


@pytest.mark.parametrize(("raw", "status", "words"), [
    ({"name": "bad", "expr": "x + os.system('id')"}, 400, "column 5"),
    ({"name": "bad", "expr": "__import__('os')"}, 400, "allowed"),
    ({"name": "bad", "expr": "y * 2"}, 400, "unknown name 'y'"),
    ({"name": "bad", "expr": "relu(" * 40 + "x" + ")" * 40}, 400, "deeper"),
    ({"name": "bad", "expr": "x" + " + x" * 200}, 400, "characters"),
    ({"name": "Bad-Name", "expr": "x"}, 400, "name must match"),
    ({"name": "bad", "expr": "x * a", "params": {"a": {"default": 20, "max": 10}}}, 400, "outside"),
    ({"name": "bad", "expr": "x", "params": {"x": 1}}, 400, "param name"),
    ({"name": "bad", "expr": "x", "code": "1"}, 400, "unknown field"),
    ({"name": "bad", "expr": 3}, 400, "string"),
    ({"name": "bad"}, 400, "string"),
])
def test_bad_registrations_are_clear_400s(srv, raw, status, words):
    r = httpx.post(srv.url + "/v1/activations", json=raw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert httpx.post(srv.url + "/v1/activations/bad?shape=1", content=b"\0" * 4,
                      headers={"content-type": "application/octet-stream"}).status_code == 404


def test_bad_request_params_and_bodies(registered):
    r = httpx.post(registered.url + "/v1/activations/my_elu",
                   json={"data": [1.0], "params": {"alpha": 11}})
    assert r.status_code == 400 and "alpha" in r.json()["error"]["message"]
    r = httpx.post(registered.url + "/v1/activations/gate",
                   json={"data": [1.0], "inplace": True})
    assert r.status_code == 400 and "in-place" in r.json()["error"]["message"]
    r = httpx.post(registered.url + "/v1/activations", content=b"name=x",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = httpx.post(registered.url + "/v1/activations", content=b"{",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(registered.url + "/v1/activations", content=b"[" * 20000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_delete(srv):
    assert httpx.post(srv.url + "/v1/activations",
                      json={"name": "gone", "expr": "x - 1"}).status_code == 201
    assert httpx.post(srv.url + "/v1/activations/gone", json={"data": [3]}).json()["data"] == [2.0]
    assert httpx.delete(srv.url + "/v1/activations/gone").status_code == 204
    assert httpx.post(srv.url + "/v1/activations/gone", json={"data": [3]}).status_code == 404
    assert httpx.get(srv.url + "/v2/models/gone").status_code == 404
    assert httpx.delete(srv.url + "/v1/activations/gone").status_code == 404
    r = httpx.delete(srv.url + "/v1/activations/relu")
    assert r.status_code == 400 and "built in" in r.json()["error"]["message"]
    # the name is free again, for a different formula
    assert httpx.post(srv.url + "/v1/activations",
                      json={"name": "gone", "expr": "x + 1"}).status_code == 201
    assert httpx.post(srv.url + "/v1/activations/gone", json={"data": [3]}).json()["data"] == [4.0]


def test_registration_needs_an_api_key_when_keys_are_set():
    with serve(api_keys="k1") as s:
        assert httpx.post(s.url + "/v1/activations", json=GATE).status_code == 401
        assert httpx.delete(s.url + "/v1/activations/gate").status_code == 401
        auth = {"authorization": "Bearer k1"}
        assert httpx.post(s.url + "/v1/activations", json=GATE, headers=auth).status_code == 201
        assert httpx.delete(s.url + "/v1/activations/gate", headers=auth).status_code == 204


def test_activations_file_at_start_up(tmp_path):
    path = tmp_path / "acts.toml"
    path.write_text('[[activation]]\nname = "gate"\nexpr = "relu(x) * sigmoid(x)"\n\n'
                    '[[activation]]\nname = "my_elu"\nexpr = "x if x > 0 else alpha * (exp(x) - 1)"\n'
                    '[activation.params.alpha]\ndefault = 1.0\nmin = 0\nmax = 10\n')
    with serve(activations_file=str(path)) as s:
        names = {a["name"] for a in httpx.get(s.url + "/v1/activations").json()["activations"]}
        assert {"gate", "my_elu"} <= names
        x = sample(64, "float32", 1)
        r = httpx.post(s.url + "/v1/activations/my_elu?shape=64", content=x.tobytes(),
                       headers={"content-type": "application/octet-stream"})
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(ELU, x))


def test_engine_process_serves_custom_and_inline():
    x = sample(300, "float32", 5)
    with serve(engine="process") as s:
        r = httpx.post(s.url + "/v1/activations", json=GATE, timeout=60)
        assert r.status_code == 201 and r.json()["custom"] is True
        # the server process never compiles: the catalogue leaves fusion to the engine's entry
        assert "fusion" not in httpx.get(s.url + "/v1/activations/gate").json()
        r = httpx.post(s.url + "/v1/activations/gate?shape=300", content=x.tobytes(),
                       headers={"content-type": "application/octet-stream"})
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(GATE, x))
        r = httpx.post(s.url + "/v1/activations/expr?shape=300&expr=relu(x)*sigmoid(x)",
                       content=x.tobytes(), headers={"content-type": "application/octet-stream"})
        assert same_bits(np.frombuffer(r.content, np.float32), _lone(GATE, x))
        r = httpx.post(s.url + "/v1/activations/expr", json={"data": [1.0], "expr": "x + y"})
        assert r.status_code == 400 and "'y'" in r.json()["error"]["message"]
        assert httpx.delete(s.url + "/v1/activations/gate").status_code == 204
        assert httpx.post(s.url + "/v1/activations/gate", json={"data": [1.0]}).status_code == 404


def test_custom_and_inline_over_grpc():
    import tritonclient.grpc as grpcclient

    from loadtest.servers import free_port

    port = free_port()
    with serve(grpc_port=port) as s:
        assert httpx.post(s.url + "/v1/activations", json=GATE).status_code == 201
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = sample(300, "float32", 9)
        inp = grpcclient.InferInput("input", [x.size], "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("gate", [inp]).as_numpy("output")
        assert same_bits(got, _lone(GATE, x))
        r = client.infer("expr", [inp], parameters={"expr": "relu(x) * sigmoid(x)"})
        assert r.get_response().model_name == "expr"
        assert same_bits(r.as_numpy("output"), _lone(GATE, x))


_NEAR = st.text(alphabet="x()+-*/.0123456789 e,<>=ifsigmodrelutanhxpaq_'\"[]{}:", max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_NEAR, st.text(max_size=40)))
def test_any_text_over_http_is_served_or_a_400_never_a_500(srv, text):
    r = httpx.post(srv.url + "/v1/activations/expr", content=json.dumps(
        {"data": [-1.0, 0.5, 2.0], "expr": text}), headers=JSON)
    assert r.status_code in (200, 400), (text, r.status_code, r.text)
    name = f"h{abs(hash(text)) % 10**12}"
    r = httpx.post(srv.url + "/v1/activations", content=json.dumps({"name": name, "expr": text}),
                   headers=JSON)
    assert r.status_code in (201, 400, 409), (text, r.status_code, r.text)
    if r.status_code == 201:
        assert httpx.delete(f"{srv.url}/v1/activations/{name}").status_code == 204


@pytest.mark.parametrize("engine", ["inline", "process"])
def test_a_bad_activations_file_stops_start_up_naming_the_entry(tmp_path, engine):
    from service.errors import InvalidRequest
    from service.http.app import create_app
    from service.settings import Settings

    path = tmp_path / "bad.toml"
    path.write_text('[[activation]]\nname = "ok"\nexpr = "x"\n\n'
                    '[[activation]]\nname = "bad"\nexpr = "x + open(1)"\n')
    app = create_app(Settings(activations_file=str(path), grpc_port=0, access_log=False,
                              engine=engine))

    async def start():
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(InvalidRequest, match=r"bad\.toml: activation\[1\]\.expr: the function 'open'"):
        asyncio.run(start())
