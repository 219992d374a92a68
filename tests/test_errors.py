"""Every row of the error table (README.md, "Errors"), and bad input harming nobody else."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from service.errors import STATUS_TABLE

from .conftest import reference, same_bits, serve
from .gates import block_executor, held, submissions, wait_for

BIN = {"content-type": "application/octet-stream"}


def _err(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"type", "message"}
    assert words.lower() in body["message"].lower(), body
    assert r.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid json"),
        (b"[1, 2]", "json object"),
        (json.dumps({"dat": [1]}).encode(), "unknown field"),
        (json.dumps({"shape": [2]}).encode(), "missing field 'data'"),
        (json.dumps({"data": [1, 2, 3], "shape": [2, 2]}).encode(), "needs 4"),
        (json.dumps({"data": [[1, 2], [3]]}).encode(), "rectangular"),
        (json.dumps({"data": [1, None]}).encode(), "only numbers"),
        (json.dumps({"data": ["a"]}).encode(), "only numbers"),
        (json.dumps({"data": [1], "dtype": "int8"}).encode(), "dtype"),
        (json.dumps({"data": [1], "compute_dtype": "float8"}).encode(), "compute_dtype"),
        (json.dumps({"data": [1], "shape": [-1]}).encode(), ">= 0"),
        (json.dumps({"data": [1], "amp": "maybe"}).encode(), "amp must be true or false"),
        (json.dumps({"data": [1], "timeout": -1}).encode(), "timeout must be > 0"),
        (json.dumps({"data": [1], "params": {"negative_slope": "x"}}).encode(), "negative_slope"),
        (json.dumps({"data": [1], "params": {"slope": 0.1}}).encode(), "allowed: negative_slope"),
        (json.dumps({"data": [1], "params": {"negative_slope": 1e300}}).encode(), "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid json"),
    ],
)
def test_400_malformed_json(app_client, body, words):
    r = app_client.post("/v1/activations/leaky_relu", content=body,
                    headers={"content-type": "application/json"})
    _err(r, 400, words)


@pytest.mark.parametrize(
    ("query", "body", "words"),
    [
        ({"shape": "4"}, b"\0" * 15, "needs 16"),
        ({"shape": "4"}, b"\0" * 17, "needs 16"),
        ({"shape": "a,b"}, b"", "comma-separated"),
        ({}, b"\0" * 4, "shape="),
        ({"shape": "1", "dtype": "complex64"}, b"\0" * 8, "dtype"),
        ({"shape": "1", "negative_slope": "nan"}, b"\0" * 4, "out of range"),
        ({"shape": "1", "bogus": "1"}, b"\0" * 4, "unknown parameter"),
    ],
)
def test_400_malformed_binary(app_client, query, body, words):
    r = app_client.post("/v1/activations/leaky_relu", params=query, content=body, headers=BIN)
    _err(r, 400, words)


def test_400_combination_that_cannot_run_names_why(app_client):
    r = app_client.post("/v1/activations/gelu", json={"data": [1.0], "inplace": True})
    _err(r, 400, "no in-place form")
    r = app_client.post("/v1/activations/hardtanh",
                    json={"data": [1.0], "params": {"min_val": 2, "max_val": 1}})
    _err(r, 400, "min_val <= max_val")
    r = app_client.post("/v1/activations/relu", json={"data": [1.0], "amp_dtype": "float16"})
    _err(r, 400, "amp is false")


def test_404_unknown_activation(app_client):
    body = _err(app_client.post("/v1/activations/nope", json={"data": [1]}), 404, "unknown activation")
    assert body["type"] == "not_found"


def test_415_unsupported_content_type(app_client):
    r = app_client.post("/v1/activations/relu", content=b"1,2", headers={"content-type": "text/csv"})
    _err(r, 415, "application/json or application/octet-stream")
    r = app_client.post("/v1/activations/relu", content=b"x",
                    headers={"content-type": "application/json", "content-encoding": "br"})
    _err(r, 415, "content-encoding")


def test_413_body_over_limit_declared_and_streamed():
    with serve(max_request_bytes=1024) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/v1/activations/relu", params={"shape": "512"}, content=b"\0" * 2048,
                   headers=BIN)
        _err(r, 413, "max_request_bytes")

        def chunks():  # no Content-Length: chunked transfer, counted as it streams
            for _ in range(64):
                yield b"\0" * 64

        r = c.post("/v1/activations/relu", params={"shape": "1024"}, content=chunks(),
                   headers=BIN)
        _err(r, 413, "max_request_bytes")
        assert c.get("/readyz").status_code == 200


def test_413_shape_over_batch_limit_refused_before_allocation(app_client, app):
    limit = app.engine.settings.max_batch_elements
    r = app_client.post("/v1/activations/relu", params={"shape": f"{limit},{limit}"}, content=b"",
                    headers=BIN)
    _err(r, 413, "max_batch_elements")


@pytest.mark.parametrize("shape", ["0,18446744073709551616", "9223372036854775808,0"])
def test_413_empty_shape_with_a_huge_dimension(app_client, shape):
    """No elements, but no array could hold that dimension: refused, never a 500 (found by
    tests/test_fuzz.py)."""
    r = app_client.post("/v1/activations/relu", params={"shape": shape}, content=b"", headers=BIN)
    _err(r, 413, "a dimension of")


def test_gzip_body_and_inflate_limit():
    import gzip

    with serve(max_request_bytes=4096) as srv, httpx.Client(base_url=srv.url) as c:
        x = np.arange(-4, 4, dtype="<f4")
        r = c.post("/v1/activations/relu", params={"shape": "8"}, content=gzip.compress(x.tobytes()),
                   headers={**BIN, "content-encoding": "gzip"})
        assert r.status_code == 200 and np.frombuffer(r.content, "<f4").tolist() == [0] * 4 + [0, 1, 2, 3]
        bomb = gzip.compress(b"\0" * 1_000_000)
        r = c.post("/v1/activations/relu", params={"shape": "250000"}, content=bomb,
                   headers={**BIN, "content-encoding": "gzip"})
        _err(r, 413, "inflated")


def test_503_queue_full_at_once_with_retry_after():
    with serve(max_queue_requests=2, max_batch_requests=1) as srv:
        async def overflow():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                base = submissions(srv.engine).count
                gate = block_executor(srv.engine)
                try:
                    post = lambda: c.post("/v1/activations/relu", json={"data": [1.0]})  # noqa: E731
                    rt = srv.engine
                    tasks = [asyncio.ensure_future(post())]  # dispatched to the held executor
                    await wait_for(lambda: submissions(rt).count - base >= 1 and not rt.batcher.waiting)
                    tasks += [asyncio.ensure_future(post()) for _ in range(2)]  # fill the queue
                    await wait_for(lambda: submissions(rt).count - base >= 3)
                    t0 = time.perf_counter()
                    r = await c.post("/v1/activations/relu", json={"data": [1.0]})
                    elapsed = time.perf_counter() - t0
                finally:
                    gate.set()
                return r, elapsed, await asyncio.gather(*tasks)

        r, elapsed, accepted = asyncio.run(overflow())
        _err(r, 503, "queue is full")
        assert r.json()["error"]["type"] == "queue_full"
        assert r.headers["retry-after"] == "1"
        assert elapsed < 5  # answered at once, not after the blocked batch
        assert [a.status_code for a in accepted] == [200, 200, 200]


def test_504_deadline_passed_while_waiting_never_computed():
    with serve() as srv:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                rt = srv.engine
                async with held(rt, 2):
                    filler = asyncio.ensure_future(c.post("/v1/activations/relu", json={"data": [1.0]}))
                    await wait_for(lambda: submissions(rt).count >= 1 and not rt.batcher.waiting)
                    late = asyncio.ensure_future(c.post(
                        "/v1/activations/softsign", json={"data": [1.0], "timeout": 0.05}))
                    # the gate stays closed until the late request's deadline has passed
                    r = await late
                assert (await filler).status_code == 200
                return r

        batches_before = _count(srv, "actserve_batches_total", "softsign")
        r = asyncio.run(run())
        _err(r, 504, "deadline")
        assert _count(srv, "actserve_batches_total", "softsign") == batches_before
        assert _count(srv, "actserve_rejections_total", "deadline") >= 1


def _count(srv, metric: str, label: str) -> float:
    total = 0.0
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(metric + "{") and f'"{label}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_503_draining_and_readiness():
    with serve() as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/readyz").status_code == 200
        srv.loop.call_soon_threadsafe(srv.engine.begin_drain)
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            pass
        r = c.get("/readyz")
        _err(r, 503, "draining")
        r = c.post("/v1/activations/relu", json={"data": [1.0]})
        _err(r, 503, "shutting down")
        assert r.headers["retry-after"]


def test_500_compute_failure_of_one_request_alone():
    with serve(fault_injection=True) as srv:
        xs = [np.random.default_rng(i).standard_normal(50 + i).astype("<f4") for i in range(6)]

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                async with held(srv.engine, len(xs)):
                    tasks = [asyncio.ensure_future(c.post(
                        "/v1/activations/tanh", params={"shape": str(x.size)},
                        content=x.tobytes(),
                        headers={**BIN, **({"x-actserve-fault": "compute"} if i == 3 else {})}))
                        for i, x in enumerate(xs)]
                return await asyncio.gather(*tasks)

        rs = asyncio.run(run())
        for i, (x, r) in enumerate(zip(xs, rs, strict=True)):
            if i == 3:
                _err(r, 500, "injected compute fault")
            else:
                assert r.status_code == 200
                assert same_bits(np.frombuffer(r.content, "<f4"), reference("tanh", x, "float32")[0])


def test_bad_requests_among_good_ones_harm_none(server):
    rng = np.random.default_rng(3)
    good = [rng.standard_normal(n).astype("<f4") for n in (1, 100, 5000, 70_000)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async with held(server.engine, len(good)):
                tasks = []
                for i, x in enumerate(good):
                    tasks.append(c.post("/v1/activations/sigmoid", params={"shape": str(x.size)},
                                        content=x.tobytes(), headers=BIN))
                    tasks.append(c.post("/v1/activations/sigmoid", params={"shape": "3"},
                                        content=b"\0" * (5 + i), headers=BIN))
                    tasks.append(c.post("/v1/activations/sigmoid", content=b"{bad",
                                        headers={"content-type": "application/json"}))
                    tasks.append(c.post("/v1/activations/nope", json={"data": [1]}))
                futures = [asyncio.ensure_future(t) for t in tasks]
            return await asyncio.gather(*futures)

    rs = asyncio.run(run())
    for i, x in enumerate(good):
        ok, short, bad_json, unknown = rs[4 * i: 4 * i + 4]
        assert ok.status_code == 200
        assert same_bits(np.frombuffer(ok.content, "<f4"), reference("sigmoid", x, "float32")[0])
        assert (short.status_code, bad_json.status_code, unknown.status_code) == (400, 400, 404)
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_status_table_is_the_design_table():
    by_name = {cls.__name__: status for cls, status in STATUS_TABLE.items()}
    assert by_name == {"InvalidRequest": 400, "Unauthorized": 401, "UnknownActivation": 404,
                       "Conflict": 409, "RequestTimeout": 408,
                       "RequestTooLarge": 413, "UnsupportedMediaType": 415, "QueueFull": 503,
                       "NotReady": 503, "Draining": 503, "DeadlineExceeded": 504,
                       "ComputeError": 500}
    for cls, status in STATUS_TABLE.items():
        assert cls("x").status == status
