"""The v2 API's contract beyond the client library: error bodies on every /v2 route,
metadata, parameters (settings, timeout, priority), a batch shared with the native API,
statistics, and readiness while draining."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from .conftest import reference, same_bits, serve

X = [-2.0, -0.5, 0.0, 0.5, 2.0]


def v2_json(data=X, shape=None, datatype="FP32", parameters=None, **extra) -> dict:
    tensor = {"name": "input", "shape": shape or [len(data)], "datatype": datatype, "data": data}
    body = {"inputs": [tensor], **extra}
    if parameters is not None:
        body["parameters"] = parameters
    return body


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


# -- plain requests on the shared server -----------------------------------------------------
def test_json_nested_and_flat_data_row_major(app_client):
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 4
    expected, _ = reference("hardtanh", x, "float32", params={"min_val": -0.5, "max_val": 1.0})
    for data in (x.tolist(), x.reshape(-1).tolist()):
        r = app_client.post("/v2/models/hardtanh/infer",
                        json=v2_json(data, [3, 4], parameters={"min_val": -0.5, "max_val": 1.0}))
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [3, 4] and len(out["data"]) == 12  # flat, row-major
        assert same_bits(np.asarray(out["data"], dtype=np.float32).reshape(3, 4), expected)


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_large_binary_answer_in_pieces_is_exact_and_framed(app_client, encoding):
    """Answers of 64 KiB or more leave as the JSON header and a zero-copy view of the
    tensor, never joined; the framing (Content-Length, Inference-Header-Content-Length)
    must still describe one body, plain or compressed."""
    x = np.random.default_rng(7).standard_normal(70_001).astype("<f4")
    head = json.dumps({"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "output",
                                    "parameters": {"binary_data": True}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "content-type": "application/octet-stream"}
    headers["accept-encoding"] = encoding or "identity"  # httpx asks for gzip by default
    r = app_client.post("/v2/models/silu/infer", content=head + x.tobytes(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers.get("content-encoding") == encoding
    if encoding is None:
        assert int(r.headers["content-length"]) == len(r.content)
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - n
    want, _ = reference("silu", x, "float32")
    assert same_bits(np.frombuffer(r.content[n:], "<f4"), want)


def test_versioned_routes(app_client):
    r = app_client.post("/v2/models/relu/versions/1/infer", json=v2_json())
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    assert app_client.get("/v2/models/relu/versions/1").json()["name"] == "relu"
    assert app_client.get("/v2/models/relu/versions/1/ready").status_code == 200
    assert app_client.get("/v2/models/relu/versions/1/stats").json()["model_stats"][0]["name"] == "relu"
    for path in ("/v2/models/relu/versions/2", "/v2/models/relu/versions/2/ready",
                 "/v2/models/relu/versions/2/stats"):
        assert "version" in error_of(app_client.get(path), 404)
    assert "version" in error_of(app_client.post("/v2/models/relu/versions/x/infer", json=v2_json()), 404)


def test_health_and_metadata_bodies(app_client):
    assert app_client.get("/v2/health/live").status_code == 200
    assert app_client.get("/v2/health/ready").status_code == 200
    meta = app_client.get("/v2/models/gelu").json()
    assert meta["parameters"]["approximate"] == "none"
    assert meta["parameters"]["inplace_supported"] is False
    assert meta["platform"] and meta["outputs"][0]["datatype"] == "FP32"
    stats = app_client.get("/v2/models/stats").json()["model_stats"]
    assert len(stats) == len(app_client.get("/v1/activations").json()["activations"])


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/nope", 404),
    ("GET", "/v2/models/nope/ready", 404),
    ("GET", "/v2/models/nope/stats", 404),
    ("GET", "/v2/nowhere", 404),
    ("GET", "/v2/models/relu/infer", 405),
    ("POST", "/v2/health/live", 405),
    ("POST", "/v2/models/nope/infer", 404),
])
def test_every_v2_error_is_an_error_object(app_client, method, path, status):
    r = app_client.request(method, path, json=v2_json())
    message = error_of(r, status)
    assert "detail" not in r.text and message


@pytest.mark.parametrize(("body", "words"), [
    (b"[1, 2]", ["JSON object"]),
    (b"{not json", ["JSON"]),
    (json.dumps({"inputs": []}).encode(), ["inputs"]),
    (json.dumps(v2_json(datatype="INT32")).encode(), ["INT32", "FP32"]),
    (json.dumps(v2_json(shape=[2, 2])).encode(), ["shape", "needs 4"]),
    (json.dumps(v2_json(data=[[1, 2], [3]], shape=[3])).encode(), ["rectangular"]),
    (json.dumps(v2_json(data=["a"], shape=[1])).encode(), ["numbers"]),
    (json.dumps(v2_json(shape=[-5])).encode(), ["shape"]),
    (json.dumps(v2_json(parameters={"bogus": 1})).encode(), ["bogus", "relu"]),
    (json.dumps(v2_json(parameters={"compute_dtype": "int8"})).encode(), ["compute_dtype"]),
    (json.dumps(v2_json(parameters={"timeout": -1})).encode(), ["timeout"]),
    (json.dumps(v2_json(parameters={"priority": 1.5})).encode(), ["priority"]),
    (json.dumps(v2_json(parameters={"sequence_id": 7})).encode(), ["sequence"]),
    (json.dumps(v2_json(parameters={"binary_data_output": "yes"})).encode(), ["binary_data_output"]),
    (json.dumps(v2_json(id=5)).encode(), ["id"]),
    (json.dumps(v2_json(outputs=[{"name": "y"}])).encode(), ["'y'", "'output'"]),
    (json.dumps(v2_json(outputs=[{"name": "output"}, {"name": "output"}])).encode(),
     ["'output'", "twice"]),
    (json.dumps(v2_json(outputs=[{"name": "output", "parameters": {"classification": 2}}])).encode(),
     ["classification"]),
])
def test_invalid_requests_are_400_naming_the_field(app_client, body, words):
    message = error_of(app_client.post("/v2/models/relu/infer", content=body), 400)
    for word in words:
        assert word in message, message


def test_inplace_without_an_inplace_form(app_client):
    r = app_client.post("/v2/models/gelu/infer", json=v2_json(parameters={"inplace": True}))
    assert "in-place" in error_of(r, 400)


def test_v2_requests_are_labelled_in_metrics(app_client):
    assert app_client.post("/v2/models/relu/infer", json=v2_json()).status_code == 200
    text = app_client.get("/metrics").text
    assert any(line.startswith("actserve_requests_total{") and 'api="v2"' in line
               and 'activation="relu"' in line for line in text.splitlines())


def test_server_timing_on_v2(app_client):
    r = app_client.post("/v2/models/relu/infer", json=v2_json())
    assert "compute;dur=" in r.headers["server-timing"]


# -- scheduling, with the compute thread held by the test -------------------------------------
@contextmanager
def held_executor(engine):
    """Occupy the compute thread until the block ends; yields a spy on executed batches."""
    gate, started = threading.Event(), threading.Event()
    batches: list[list[tuple[str, int]]] = []
    observer = engine.batcher.on_batch

    def spy(jobs, results, wall):
        batches.append([(j.api, j.priority) for j in jobs])
        if observer is not None:
            observer(jobs, results, wall)

    def hold(_compute):
        started.set()
        gate.wait(60)

    engine.batcher.on_batch = spy
    engine.pool.executors[0].call(hold)
    assert started.wait(30), "compute thread did not pick up the gate"
    try:
        yield gate, batches
    finally:
        gate.set()
        engine.batcher.on_batch = observer


def until(predicate, timeout: float = 30.0) -> None:
    """Wait for a state another thread makes true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


@pytest.fixture()
def own_server():
    with serve() as srv:
        yield srv


def test_priority_higher_first_and_timeout_in_microseconds(own_server):
    rt = own_server.engine
    ex = rt.pool.executors[0]
    with httpx.Client(base_url=own_server.url, timeout=60) as http, ThreadPoolExecutor(4) as pool, \
            held_executor(rt) as (gate, batches):
        post = http.post
        filler = pool.submit(post, "/v2/models/relu/infer", json=v2_json())
        until(lambda: ex.inflight_batches == 1)  # dispatched, stuck behind the gate
        low = pool.submit(post, "/v2/models/relu/infer", json=v2_json(parameters={"priority": 1}))
        until(lambda: rt.batcher.waiting == 1)
        high = pool.submit(post, "/v2/models/relu/infer", json=v2_json(parameters={"priority": 9}))
        until(lambda: rt.batcher.waiting == 2)
        # 20 ms in microseconds: expires in the queue while the gate is still closed
        late = post("/v2/models/relu/infer", json=v2_json(parameters={"timeout": 20_000}))
        assert "deadline" in error_of(late, 504)
        gate.set()
        responses = [f.result(60) for f in (filler, low, high)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert batches == [[("v2", 0)], [("v2", 9)], [("v2", 1)]]


def test_v2_and_native_share_a_batch(own_server):
    rt = own_server.engine
    ex = rt.pool.executors[0]
    x = np.linspace(-3, 3, 11, dtype=np.float32)
    expected, _ = reference("leaky_relu", x, "float32", params={"negative_slope": 0.2})
    with httpx.Client(base_url=own_server.url, timeout=60) as http, ThreadPoolExecutor(3) as pool, \
            held_executor(rt) as (gate, batches):
        post = http.post
        filler = pool.submit(post, "/v2/models/relu/infer", json=v2_json())
        until(lambda: ex.inflight_batches == 1)
        native = pool.submit(post, "/v1/activations/leaky_relu",
                             json={"data": x.tolist(), "params": {"negative_slope": 0.2}})
        v2 = pool.submit(post, "/v2/models/leaky_relu/infer",
                         json=v2_json(x.tolist(), parameters={"negative_slope": 0.2}))
        until(lambda: rt.batcher.waiting == 2)
        gate.set()
        filler.result(60)
        rn, rv = native.result(60), v2.result(60)
    assert rn.status_code == rv.status_code == 200
    assert rn.headers["x-batch-size"] == rv.headers["x-batch-size"] == "2"
    assert sorted(batches[1]) == [("native", 0), ("v2", 0)]
    assert same_bits(np.asarray(rn.json()["data"], dtype=np.float32), expected)
    assert same_bits(np.asarray(rv.json()["outputs"][0]["data"], dtype=np.float32), expected)
    stats = httpx.get(own_server.url + "/v2/models/leaky_relu/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 2 and stats["execution_count"] == 1
    assert [b["batch_size"] for b in stats["batch_stats"]] == [2]
    assert stats["batch_stats"][0]["compute_infer"]["count"] == 1


def test_not_ready_while_draining(own_server):
    with httpx.Client(base_url=own_server.url, timeout=60) as client:
        check_draining(client, own_server.engine)


def check_draining(client, engine):
    assert client.get("/v2/health/ready").status_code == 200
    engine.batcher.begin_drain()
    assert client.get("/v2/health/live").status_code == 200
    for path in ("/v2/health/ready", "/v2/models/relu/ready"):
        r = client.get(path)
        assert "draining" in error_of(r, 503) and r.headers["retry-after"]
    r = client.post("/v2/models/relu/infer", json=v2_json())
    assert error_of(r, 503) and r.headers["retry-after"]
