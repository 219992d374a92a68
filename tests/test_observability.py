"""What a person sees on each response and in the logs: ``Server-Timing`` (parts add up to
no more than the total; queue time grows while the executor is busy), the batch a request
rode in, ``X-Request-Id``, and one structured JSON access-log line per request."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest

from .conftest import serve, subprocess_server
from .test_metrics import hold_executor, scrape, value, wait_until

PARTS = ("decode", "queue", "compute", "encode", "total")


def timing(response: httpx.Response) -> dict[str, float]:
    """``Server-Timing`` -> {name: milliseconds}."""
    out = {}
    for item in response.headers["server-timing"].split(","):
        name, _, dur = item.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def check_parts(response: httpx.Response) -> dict[str, float]:
    t = timing(response)
    assert tuple(t) == PARTS, response.headers["server-timing"]
    # decoding, computing and encoding take time (microsecond resolution); waiting may not
    assert t["decode"] > 0 and t["compute"] > 0 and t["encode"] > 0, t
    assert 0 <= t["queue"] < t["total"], t
    parts = t["decode"] + t["queue"] + t["compute"] + t["encode"]
    # the header rounds parts down and the total up, to the microsecond
    assert parts <= t["total"] + 1e-9, t
    return t


def test_server_timing_parts_add_up_to_no_more_than_total():
    rng = np.random.default_rng(7)
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        responses = []
        for n in (1, 17, 4096, 100_000):
            x = rng.standard_normal(n).astype("<f4")
            responses.append(c.post("/v1/activations/gelu", json={"data": x.tolist()}))
            responses.append(c.post("/v1/activations/silu", params={"shape": str(n)},
                                    content=x.tobytes(),
                                    headers={"content-type": "application/octet-stream"}))
        responses.append(c.post("/v1/activations/relu", json={
            "data": [1.0, -2.0], "inplace": True, "compute_dtype": "float16"}))
        # concurrent requests that share batches
        with ThreadPoolExecutor(8) as pool:
            responses += list(pool.map(
                lambda i: c.post("/v1/activations/tanh", json={"data": [float(i)] * (i + 1)}),
                range(32)))
        for r in responses:
            assert r.status_code == 200, r.text
            t = check_parts(r)
            assert int(r.headers["x-batch-size"]) >= 1
            assert int(r.headers["x-batch-elements"]) >= int(np.prod(
                r.json()["shape"] if r.headers["content-type"].startswith("application/json")
                else [int(d) for d in r.headers["x-shape"].split(",")]))
            assert t["total"] > 0


def test_error_answers_carry_total_timing_and_request_id():
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for r in (c.post("/v1/activations/relu", content=b"{", headers={"content-type":
                                                                         "application/json"}),
                  c.post("/v1/activations/nope", json={"data": [1.0]}),
                  c.post("/v1/activations/relu", json={"data": [1.0], "timeout": -1})):
            assert r.status_code in (400, 404), r.text
            assert re.fullmatch(r"total;dur=\d+\.\d{3}", r.headers["server-timing"])
            assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", r.headers["x-request-id"])


def test_queue_time_grows_while_the_executor_is_busy():
    hold_s = 0.2
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c, \
            ThreadPoolExecutor(2) as pool:
        rt = srv.engine
        idle = [timing(c.post("/v1/activations/relu", json={"data": [1.0]}))["queue"]
                for _ in range(5)]
        gate = hold_executor(rt)
        try:
            first = pool.submit(c.post, "/v1/activations/relu", json={"data": [1.0]})
            wait_until(lambda: rt.pool.executors[0].inflight_batches == 1)  # behind the gate
            queued = pool.submit(c.post, "/v1/activations/relu", json={"data": [2.0]})
            wait_until(lambda: rt.batcher.waiting == 1)
            # The busy period under test: the executor stays held this long while the
            # second request waits in the queue.
            threading.Event().wait(hold_s)
        finally:
            gate.set()
        r_first, r_queued = first.result(60), queued.result(60)
        assert r_first.status_code == r_queued.status_code == 200
        busy = check_parts(r_queued)
        check_parts(r_first)
        m = scrape(c)
        stats = c.get("/v1/stats").json()["activations"]["relu"]
    assert busy["queue"] >= hold_s * 1000, busy
    assert min(idle) < hold_s * 1000 <= busy["queue"], (idle, busy)
    assert busy["total"] >= busy["queue"]
    # the histogram and the stats window saw the long wait too
    count = value(m, "actserve_queue_wait_seconds_count", activation="relu")
    under = value(m, "actserve_queue_wait_seconds_bucket", activation="relu", le="0.1")
    assert count == 7 and under <= 6
    assert stats["queue_ms"]["max"] >= hold_s * 1000


def test_batch_headers_name_the_batch_a_request_rode_in():
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c, \
            ThreadPoolExecutor(4) as pool:
        rt = srv.engine
        gate = hold_executor(rt)
        try:
            lone = pool.submit(c.post, "/v1/activations/elu", json={"data": [1.0]})
            wait_until(lambda: rt.pool.executors[0].inflight_batches == 1)
            rest = [pool.submit(c.post, "/v1/activations/elu", json={"data": [1.0] * n})
                    for n in (2, 3, 4)]
            wait_until(lambda: rt.batcher.waiting == 3)
        finally:
            gate.set()
        r = lone.result(60)
        assert (r.headers["x-batch-size"], r.headers["x-batch-elements"]) == ("1", "1")
        for f in rest:
            r = f.result(60)
            assert r.status_code == 200
            assert (r.headers["x-batch-size"], r.headers["x-batch-elements"]) == ("3", "9")


def test_request_id_is_taken_from_the_client_or_generated():
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/activations/relu", json={"data": [1.0]},
                   headers={"x-request-id": "client-id.42:a"})
        assert r.headers["x-request-id"] == "client-id.42:a"
        r = c.post("/v1/activations/relu", json={"data": [1.0]},
                   headers={"x-request-id": "not ok\twith spaces"})
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", r.headers["x-request-id"])
        ids = {c.get("/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3


def _access_lines(caplog) -> list[dict]:
    # the access log emits its lines in batches: one record may hold several lines
    return [orjson.loads(line) for rec in caplog.records if rec.name == "actserve.access"
            for line in rec.getMessage().splitlines()]


def test_access_log_is_one_json_line_per_request(caplog):
    caplog.set_level(logging.INFO, logger="actserve.access")
    with serve(access_log=True) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ok = c.post("/v1/activations/leaky_relu", json={"data": [[1.0, -1.0], [2.0, -2.0]],
                                                         "compute_dtype": "float64"},
                    headers={"x-request-id": "log-me-1"})
        bad = c.post("/v1/activations/leaky_relu", json={"data": [1.0], "params": {"x": 1}},
                     headers={"x-request-id": "log-me-2"})
        assert ok.status_code == 200 and bad.status_code == 400
        deadline = time.monotonic() + 10
        while len({ln["id"] for ln in _access_lines(caplog)} & {"log-me-1", "log-me-2"}) < 2:
            assert time.monotonic() < deadline, "access-log lines did not arrive"
            time.sleep(0.005)
    lines = {ln["id"]: ln for ln in _access_lines(caplog)}
    good = lines["log-me-1"]
    assert good["status"] == 200 and good["method"] == "POST"
    assert good["path"] == "/v1/activations/leaky_relu" and good["activation"] == "leaky_relu"
    assert good["shape"] == [2, 2] and good["dtype"] == "float32"
    assert good["compute_dtype"] == "float64" and good["out_dtype"] == "float64"
    assert good["batch"] == 1
    for key in ("decode_ms", "compute_ms", "encode_ms", "ms"):
        assert isinstance(good[key], float) and good[key] > 0, key
    assert isinstance(good["queue_ms"], float) and 0 <= good["queue_ms"] < good["ms"]
    assert good["ms"] >= good["queue_ms"] + good["compute_ms"]
    err = lines["log-me-2"]
    assert err["status"] == 400 and err["error"] == "invalid_request"


@pytest.mark.slow
@pytest.mark.parametrize(("level", "logged"), [("info", True), ("warning", False)])
def test_access_log_level_is_set_by_a_setting(level, logged):
    """``ACTSERVE_LOG_LEVEL`` on the real ``actserve serve``: info logs each request."""
    env = {"ACTSERVE_ACCESS_LOG": "true", "ACTSERVE_LOG_LEVEL": level}
    with subprocess_server(env) as (proc, url):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/activations/relu", json={"data": [1.0, -1.0]},
                       headers={"x-request-id": f"level-{level}"})
            assert r.status_code == 200
        proc.terminate()  # graceful: the output is complete once it exits
        proc.wait(timeout=60)
        out = proc.log_path.read_bytes()
    lines = [orjson.loads(ln) for ln in out.decode().splitlines()
             if ln.startswith("{") and f"level-{level}" in ln]
    if logged:
        assert len(lines) == 1, out.decode()[-2000:]
        assert lines[0]["status"] == 200 and lines[0]["shape"] == [2]
    else:
        assert lines == []
