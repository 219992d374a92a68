"""``GET /metrics`` counts exactly what was sent: after a known mix of requests (answers,
invalid bodies, unknown activation, too large, wrong media type, deadline, queue full) every
counter and histogram count equals the mix, not merely "the metric exists"."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.observability.metrics import LATENCY_BUCKETS, REJECT_REASONS, STAGES

from .conftest import serve

JSON = {"content-type": "application/json"}
BINARY = {"content-type": "application/octet-stream"}


# -- helpers ------------------------------------------------------------------------------
def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, frozenset(labels)): value}`` from ``/metrics``."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def wait_until(predicate, timeout: float = 30.0) -> None:
    """Wait for a condition the server's threads make true (bounded polling, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def hold_executor(engine) -> threading.Event:
    """Occupy the compute thread until the returned event is set."""
    gate, started = threading.Event(), threading.Event()

    def hold(_compute):
        started.set()
        gate.wait(60)

    engine.pool.executors[0].call(hold)
    assert started.wait(30), "the compute thread did not pick up the gate"
    return gate


def json_body(values, **extra) -> bytes:
    return orjson.dumps({"data": values, **extra})


# -- the known mix --------------------------------------------------------------------------
def test_counters_and_histograms_equal_a_known_mix():
    with serve(max_queue_requests=2, max_batch_requests=2, max_request_bytes=4096) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c, ThreadPoolExecutor(4) as pool:
        rt = srv.engine
        sent_in = 0  # request body bytes the server read
        sent_out = 0  # response body bytes of answered requests

        def post(path, body, headers, params=None, expect=200):
            nonlocal sent_in, sent_out
            r = c.post(path, content=body, headers=headers, params=params)
            assert r.status_code == expect, r.text
            if expect not in (413, 503):  # refused before the body is read
                sent_in += len(body)
            if expect == 200:
                sent_out += len(r.content)
            return r

        # phase 1, idle executor: each request is its own batch
        for i in range(3):
            post("/v1/activations/sigmoid", json_body([0.5 * i, -1.0, 2.0, 3.0]), JSON)
        x8 = np.linspace(-2, 2, 8, dtype="<f4").tobytes()
        for _ in range(2):
            post("/v1/activations/relu", x8, BINARY, {"shape": "8", "inplace": "true"})
        post("/v1/activations/relu", b'{"data": [1, 2', JSON, expect=400)
        post("/v1/activations/relu", json_body([1.0], params={"bogus": 1}), JSON, expect=400)
        post("/v1/activations/no_such_activation", json_body([1.0]), JSON, expect=404)
        post("/v1/activations/relu", json_body([1.0] * 2000), JSON, expect=413)
        post("/v1/activations/relu", b"1,2,3", {"content-type": "text/plain"}, expect=415)

        # phase 2, executor held: A computes behind the gate, D's deadline passes in the
        # queue, B and C fill the queue (2), E finds it full; B and C then share a batch.
        gate = hold_executor(rt)
        try:
            a_body = json_body([1.0])
            fut_a = pool.submit(c.post, "/v1/activations/relu", content=a_body, headers=JSON)
            wait_until(lambda: rt.pool.executors[0].inflight_batches == 1)
            post("/v1/activations/relu", json_body([1.0], timeout=0.05), JSON, expect=504)
            bc_body = json_body([2.0])
            futs = [pool.submit(c.post, "/v1/activations/relu", content=bc_body, headers=JSON)
                    for _ in range(2)]
            wait_until(lambda: rt.batcher.waiting == 2)
            during = scrape(c)
            r = post("/v1/activations/relu", json_body([3.0]), JSON, expect=503)
            assert r.headers["retry-after"]
        finally:
            gate.set()
        for fut, body in ((fut_a, a_body), (futs[0], bc_body), (futs[1], bc_body)):
            r = fut.result(60)
            assert r.status_code == 200, r.text
            sent_in += len(body)
            sent_out += len(r.content)
        assert [f.result().headers["x-batch-size"] for f in futs] == ["2", "2"]
        wait_until(lambda: not rt.pool.busy())
        m = scrape(c)

    # gauges while the executor was held: A, B, C in flight, B and C waiting
    assert value(during, "actserve_inflight_requests") == 3
    assert value(during, "actserve_queue_depth") == 2
    assert value(m, "actserve_inflight_requests") == 0
    assert value(m, "actserve_queue_depth") == 0

    expected_requests = {
        ("sigmoid", "2xx"): 3,
        ("relu", "2xx"): 5,
        ("relu", "4xx"): 4,
        ("unknown", "4xx"): 1,
        ("relu", "5xx"): 2,
    }
    got = {(dict(lbl)["activation"], dict(lbl)["status_class"]): v for (n, lbl), v in m.items()
           if n == "actserve_requests_total"}
    assert {k: v for k, v in got.items() if v} == expected_requests
    for (act, cls), n in expected_requests.items():
        labels = {"activation": act, "api": "native", "status_class": cls}
        assert value(m, "actserve_request_duration_seconds_count", **labels) == n
        assert value(m, "actserve_request_duration_seconds_bucket", le="+Inf", **labels) == n

    rejections = {dict(lbl)["reason"]: v for (n, lbl), v in m.items()
                  if n == "actserve_rejections_total"}
    assert set(rejections) == set(REJECT_REASONS)
    assert {k: v for k, v in rejections.items() if v} == {
        "invalid": 2, "not_found": 1, "too_large": 1, "unsupported_media": 1,
        "deadline": 1, "queue_full": 1,
    }
    # the two overload refusals by where they were made: D's deadline passed in the queue;
    # E was refused by the protocol, the engine busy (its queue full), before the body:
    # from the raw bytes, or after parsing where its headers came in two reads
    stages = {dict(lbl)["stage"]: v for (n, lbl), v in m.items()
              if n == "actserve_overload_refusals_total"}
    assert set(stages) == set(STAGES)
    e_stage = "unparsed_admission" if stages["unparsed_admission"] else "headers"
    assert {k: v for k, v in stages.items() if v} == {"queued": 1, e_stage: 1}

    assert value(m, "actserve_request_bytes_total", api="native") == sent_in
    assert value(m, "actserve_response_bytes_total", api="native") == sent_out
    assert value(m, "actserve_inplace_saved_bytes_total") == 2 * 8 * 4

    # batches: sigmoid 3 alone; relu: 2 binary alone, A alone, B+C together
    assert value(m, "actserve_batches_total", activation="sigmoid", device="cpu") == 3
    assert value(m, "actserve_batches_total", activation="relu", device="cpu") == 4
    assert value(m, "actserve_batch_size_requests_count", activation="relu") == 4
    assert value(m, "actserve_batch_size_requests_sum", activation="relu") == 5
    assert value(m, "actserve_batch_size_requests_bucket", activation="relu", le="1.0") == 3
    assert value(m, "actserve_batch_size_elements_sum", activation="relu") == 8 + 8 + 1 + 2
    assert value(m, "actserve_batch_size_elements_sum", activation="sigmoid") == 12
    assert value(m, "actserve_compute_seconds_count", activation="relu", device="cpu") == 4
    assert value(m, "actserve_compute_seconds_count", activation="sigmoid", device="cpu") == 3

    assert value(m, "actserve_queue_wait_seconds_count", activation="relu") == 5
    assert value(m, "actserve_queue_wait_seconds_count", activation="sigmoid") == 3
    # decoded: 3 sigmoid, 2 binary, A B C D (E was refused before its body was read);
    # encoded: the 8 answers
    assert value(m, "actserve_decode_seconds_count", api="native") == 9
    assert value(m, "actserve_encode_seconds_count", api="native") == 8

    assert value(m, "actserve_executor_restarts_total") == 0
    assert value(m, "actserve_ready") == 1


def test_latency_buckets_resolve_tens_of_microseconds_to_seconds(app_client):
    assert LATENCY_BUCKETS[0] <= 1e-5 and LATENCY_BUCKETS[-1] >= 10
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    r = app_client.post("/v1/activations/relu", json={"data": [1.0]})
    assert r.status_code == 200
    text = app_client.get("/metrics").text
    for name in ("actserve_request_duration_seconds", "actserve_queue_wait_seconds",
                 "actserve_compute_seconds", "actserve_decode_seconds", "actserve_encode_seconds"):
        assert f'{name}_bucket{{' in text and 'le="1e-05"' in text, name


def test_every_metric_of_the_issue_is_exported_with_units_and_bounded_labels(app_client):
    assert app_client.post("/v1/activations/gelu", json={"data": [0.5]}).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(app_client.get("/metrics").text)}
    wanted = {
        "actserve_requests": "counter",
        "actserve_request_duration_seconds": "histogram",
        "actserve_queue_wait_seconds": "histogram",
        "actserve_compute_seconds": "histogram",
        "actserve_decode_seconds": "histogram",
        "actserve_encode_seconds": "histogram",
        "actserve_batch_size_requests": "histogram",
        "actserve_batch_size_elements": "histogram",
        "actserve_batches": "counter",
        "actserve_queue_depth": "gauge",
        "actserve_inflight_requests": "gauge",
        "actserve_body_bytes_in_flight": "gauge",
        "actserve_body_waiting_requests": "gauge",
        "actserve_request_bytes": "counter",
        "actserve_response_bytes": "counter",
        "actserve_rejections": "counter",
        "actserve_executor_restarts": "counter",
        "actserve_inplace_saved_bytes": "counter",
        "actserve_gpu_memory_allocated_bytes": "gauge",
        "actserve_gpu_memory_peak_bytes": "gauge",
        "actserve_ready": "gauge",
    }
    for name, kind in wanted.items():
        assert name in families, name
        assert families[name].type == kind, name
    # bounded label sets only (outcome: fusion.OUTCOMES)
    allowed = {"activation", "api", "status_class", "device", "reason", "le", "outcome", "stage"}
    for name, fam in families.items():
        if name.startswith("actserve_"):
            for s in fam.samples:
                assert set(s.labels) <= allowed, (name, s.labels)
    # ids and arbitrary paths never become label values
    rid = "req-should-not-appear-0123"
    app_client.post("/v1/activations/" + "x" * 40, json={"data": [1.0]}, headers={"x-request-id": rid})
    text = app_client.get("/metrics").text
    assert rid not in text and "x" * 40 not in text
    assert 'activation="unknown"' in text


def test_executor_restart_and_compute_failure_are_counted():
    with serve(fault_injection=True) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/activations/relu", json={"data": [1.0]},
                   headers={"x-actserve-fault": "kill"})
        assert r.status_code == 503, r.text
        wait_until(lambda: srv.engine.ready)
        r = c.post("/v1/activations/relu", json={"data": [1.0]},
                   headers={"x-actserve-fault": "compute"})
        assert r.status_code == 500, r.text
        assert c.post("/v1/activations/relu", json={"data": [1.0]}).status_code == 200
        m = scrape(c)
    assert value(m, "actserve_executor_restarts_total") == 1
    assert value(m, "actserve_rejections_total", reason="executor_lost") == 1
    assert value(m, "actserve_rejections_total", reason="compute") == 1
    assert total(m, "actserve_rejections_total") == 2
    assert value(m, "actserve_requests_total", activation="relu", api="native",
                 status_class="5xx") == 2
    assert value(m, "actserve_requests_total", activation="relu", api="native",
                 status_class="2xx") == 1
    assert value(m, "actserve_ready") == 1


def test_unauthorized_requests_are_counted():
    with serve(api_keys="secret-token") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/activations/relu", json={"data": [1.0]}).status_code == 401
        ok = c.post("/v1/activations/relu", json={"data": [1.0]},
                    headers={"authorization": "Bearer secret-token"})
        assert ok.status_code == 200
        m = scrape(c)  # /metrics stays open
    assert value(m, "actserve_rejections_total", reason="unauthorized") == 1
    assert total(m, "actserve_requests_total") == 1


def test_stats_snapshot_matches_what_was_sent():
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(4):
            assert c.post("/v1/activations/relu", params={"shape": "16", "inplace": "true"},
                          content=np.ones(16, "<f4").tobytes(), headers=BINARY).status_code == 200
        for _ in range(2):
            assert c.post("/v1/activations/tanh", json={"data": [1.0, 2.0]}).status_code == 200
        assert c.post("/v1/activations/tanh", json={"data": "bad"}).status_code == 400
        snap = c.get("/v1/stats").json()
    acts = snap["activations"]
    assert set(acts) == {"relu", "tanh"}
    relu, tanh = acts["relu"], acts["tanh"]
    assert relu["requests"] == 4 and tanh["requests"] == 2  # answered requests only
    assert relu["inplace_saved_bytes"] == 4 * 16 * 4 and tanh["inplace_saved_bytes"] == 0
    assert relu["mean_batch_requests"] == 1.0 and relu["mean_batch_elements"] == 16.0
    assert relu["elements_per_s"] == pytest.approx(16 * relu["requests_per_s"], abs=0.01)
    for stats in (relu, tanh):
        for key in ("latency_ms", "queue_ms", "compute_ms"):
            p = stats[key]
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"], (key, p)
        assert stats["latency_ms"]["max"] >= stats["compute_ms"]["max"]
    assert snap["queue_depth"] == 0 and snap["executor_restarts"] == 0


def test_metrics_off_keeps_timing_headers_and_says_so():
    with serve(metrics=False) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/activations/relu", json={"data": [1.0]})
        assert r.status_code == 200 and "total;dur=" in r.headers["server-timing"]
        text = c.get("/metrics").text
        assert "disabled" in text and "actserve_requests_total" not in text
        assert c.get("/v1/stats").json()["activations"] == {}


def test_v2_requests_are_counted_under_their_api_label():
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"inputs": [{"name": "input", "shape": [3], "datatype": "FP32",
                            "data": [1.0, -1.0, 2.0]}]}
        for _ in range(2):
            r = c.post("/v2/models/relu/infer", json=body)
            assert r.status_code == 200, r.text
        assert c.post("/v2/models/relu/infer", json={"inputs": []}).status_code == 400
        assert c.post("/v1/activations/relu", json={"data": [1.0]}).status_code == 200
        m = scrape(c)
    assert value(m, "actserve_requests_total", activation="relu", api="v2", status_class="2xx") == 2
    assert value(m, "actserve_requests_total", activation="relu", api="v2", status_class="4xx") == 1
    assert value(m, "actserve_requests_total", activation="relu", api="native",
                 status_class="2xx") == 1
    assert value(m, "actserve_decode_seconds_count", api="v2") == 2
    assert value(m, "actserve_rejections_total", reason="invalid") == 1
    assert value(m, "actserve_batch_size_elements_sum", activation="relu") == 3 + 3 + 1


@pytest.mark.gpu
def test_gpu_memory_and_cuda_event_compute_are_exported():
    with serve(device="cuda:0") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        n = 1 << 20
        for _ in range(3):
            r = c.post("/v1/activations/gelu", params={"shape": str(n)},
                       content=np.ones(n, "<f4").tobytes(), headers=BINARY)
            assert r.status_code == 200, r.text
        m = scrape(c)
    assert value(m, "actserve_batches_total", activation="gelu", device="cuda:0") == 3
    assert value(m, "actserve_compute_seconds_count", activation="gelu", device="cuda:0") == 3
    assert value(m, "actserve_gpu_memory_peak_bytes", device="cuda:0") >= 2 * n * 4
    assert (value(m, "actserve_gpu_memory_peak_bytes", device="cuda:0")
            >= value(m, "actserve_gpu_memory_allocated_bytes", device="cuda:0"))


def test_stats_window_adds_nothing_to_the_garbage_collectors_walk():
    """A full /v1/stats window holds up to 50,000 samples per activation; kept as tracked
    objects they lengthened every full collection (and the latency tail)."""
    import gc

    from service.observability.stats import Sample, WindowStats

    window = WindowStats(60)
    for i in range(2000):
        window.add("relu", Sample(time.monotonic(), i / 1000, 0.0, 0.0, 1024, 1, 0, 1024))
    gc.collect()
    assert not any(gc.is_tracked(s) for s in window._samples["relu"])
    assert window.snapshot()["relu"]["requests"] == 2000
