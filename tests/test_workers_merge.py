"""Merging the workers' numbers (service/process/merge.py), on real metric registries and
v2 statistics: counters and histograms add up, gauges stay per worker, retired snapshots
add to the sums only."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.job import JobResult
from service.observability.metrics import Metrics
from service.observability.model_stats import ModelStats
from service.process import merge, wire


def samples(registry) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def worker_metrics(latencies: list[float], queue_depth: int) -> Metrics:
    m = Metrics(["relu"])
    for t in latencies:
        m.requests.labels("relu", "native", "2xx").inc()
        m.request_seconds.labels("relu", "native", "2xx").observe(t)
    m.queue_depth.set(queue_depth)
    return m


def test_counters_and_histograms_add_gauges_stay_per_worker():
    a = worker_metrics([0.001, 0.2], queue_depth=3)
    b = worker_metrics([0.001, 0.003, 7.0], queue_depth=5)
    dead = worker_metrics([0.02], queue_depth=9)
    merged = samples(merge.registry_of(merge.merge_families(
        [(0, merge.families_of(a.registry)), (1, merge.families_of(b.registry))],
        [merge.sum_families([merge.families_of(dead.registry)])])))
    req = (("activation", "relu"), ("api", "native"), ("status_class", "2xx"))
    assert merged[("actserve_requests_total", req)] == 6
    assert merged[("actserve_request_duration_seconds_count", req)] == 6
    assert abs(merged[("actserve_request_duration_seconds_sum", req)] - 7.225) < 1e-9
    le = {k[1]: v for k, v in merged.items() if k[0] == "actserve_request_duration_seconds_bucket"}
    assert le[(*req[:1], *req[1:2], ("le", "0.001"), *req[2:])] == 2
    assert le[(*req[:1], *req[1:2], ("le", "0.005"), *req[2:])] == 3
    assert le[(*req[:1], *req[1:2], ("le", "0.025"), *req[2:])] == 4
    assert le[(*req[:1], *req[1:2], ("le", "+Inf"), *req[2:])] == 6
    # gauges and process_* per worker; the retired worker has none
    assert merged[("actserve_queue_depth", (("worker", "0"),))] == 3
    assert merged[("actserve_queue_depth", (("worker", "1"),))] == 5
    assert not any(k[0] == "actserve_queue_depth" and v == 9 for k, v in merged.items())
    assert ("process_resident_memory_bytes", (("worker", "1"),)) in merged
    assert not any(k[0] == "actserve_queue_depth" and not k[1] for k in merged)


def test_v2_statistics_add_up_model_by_model():
    def stats(n: int, batch: int) -> dict:
        d = {"count": 1, "ns": 10}
        s = ModelStats(["relu", "gelu"])
        for _ in range(n):
            s.request("relu", 200, 0.5, JobResult(
                array=None, dtype="float32", compute_s=0.125, batch_requests=batch,
                batch_elements=4, device="cpu", queue_s=0.25))
        s.request("gelu", 400, 1.0, None)
        snap = s.snapshot()
        snap["model_stats"][0]["batch_stats"] = [
            {"batch_size": batch, "compute_input": d, "compute_infer": d, "compute_output": d}]
        return snap

    merged = merge.merge_model_stats([stats(2, 4), stats(3, 1), stats(1, 4)])
    relu, gelu = merged["model_stats"]
    assert (relu["name"], gelu["name"]) == ("relu", "gelu")
    assert relu["inference_count"] == 6
    assert relu["inference_stats"]["success"] == {"count": 6, "ns": 3_000_000_000}
    assert relu["inference_stats"]["queue"] == {"count": 6, "ns": 1_500_000_000}
    assert gelu["inference_stats"]["fail"] == {"count": 3, "ns": 3_000_000_000}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in relu["batch_stats"]] == \
        [(1, 1), (4, 2)]
    assert relu["last_inference"] > 0


def test_snapshots_travel_as_json_and_raw_float64_arrays():
    window = {"relu": np.arange(16.0).reshape(2, 8), "gelu": np.ones((3, 8)) / 3}
    obj = {"state": {"slot": 1, "ready": True, "inf": float("inf")}, "window": window,
           "metrics": merge.families_of(worker_metrics([0.5], 1).registry)}
    back = wire.loads(wire.dumps(obj))
    assert back["state"] == obj["state"]
    for name, rows in window.items():
        assert back["window"][name].dtype == np.float64
        assert np.array_equal(back["window"][name], rows)
    # the families merge the same after the trip
    again = samples(merge.registry_of(merge.merge_families([(0, back["metrics"])])))
    assert again == samples(merge.registry_of(merge.merge_families([(0, obj["metrics"])])))
    data = wire.dumps(obj)
    with pytest.raises(ValueError):
        wire.loads(data[:-8])  # an array cut short is refused, not read past the end


def test_a_workers_snapshot_counts_the_refusals_the_protocol_keeps_as_plain_ints():
    """The HTTP protocol counts its cheapest refusals as a plain int until a scrape
    (``Shed.count_fast``); a worker's metrics for the others (``Cluster._families``, what
    ``/metrics`` on any worker merges) settle them first, or a server with workers would
    never count them."""
    from types import SimpleNamespace

    from service.process.cluster import Cluster
    from tests.inprocess import in_process

    with in_process(metrics=True) as app:
        shed = app.services.shed
        for _ in range(3):
            shed.count_fast()
        got = samples(merge.registry_of(merge.merge_families(
            [(0, Cluster._families(SimpleNamespace(recorder=app.services.recorder)))])))
        assert got[("actserve_rejections_total", (("reason", "predicted_late"),))] == 3
        assert got[("actserve_overload_refusals_total", (("stage", "unparsed"),))] == 3
