"""The catalogue: one entry per activation, and every combination the start-up capability
probe refused listed with its reason."""

from __future__ import annotations

import time

import pytest

from service.observability.stats import Sample, WindowStats


def test_one_catalogue_entry_and_404_for_unknown_names(app_client):
    full = app_client.get("/v1/activations").json()
    relu = app_client.get("/v1/activations/relu")
    assert relu.status_code == 200, relu.text
    entry = relu.json()
    listed = next(a for a in full["activations"] if a["name"] == "relu")
    assert {k: entry[k] for k in listed} == listed
    assert entry["unsupported"] == [u for u in full["unsupported"] if u["activation"] == "relu"]
    missing = app_client.get("/v1/activations/no_such_thing")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    assert "no_such_thing" in missing.json()["error"]["message"]


def test_unsupported_lists_every_refused_combination_with_its_reason(app_client):
    full = app_client.get("/v1/activations").json()
    unsupported = full["unsupported"]
    # (``expr``, an inline expression, is checked per expression, not by the start-up probe)
    no_inplace = [a["name"] for a in full["activations"] if not a["inplace"]
                  and a["name"] != "expr"]
    assert "gelu" in no_inplace
    for name in no_inplace:  # every compute dtype x amp setting, each with the reason
        rows = [u for u in unsupported if u["activation"] == name and u["inplace"]]
        assert len(rows) == len(full["dtypes"]) * 3, name
        assert all("no in-place form" in u["reason"] for u in rows)
    # what the catalogue lists is exactly what the server refuses
    gelu = app_client.post("/v1/activations/gelu", json={"data": [1.0], "inplace": True})
    assert gelu.status_code == 400 and "in-place" in gelu.json()["error"]["message"]
    for u in unsupported:
        assert set(u) == {"activation", "compute_dtype", "amp", "amp_dtype", "inplace", "reason"}
        assert u["reason"]
    listed = {(u["activation"], u["compute_dtype"], u["amp"], u["inplace"]) for u in unsupported}
    assert ("relu", "float32", False, False) not in listed


@pytest.mark.parametrize(("rate", "seconds"), [(250, 10.0), (40, 3.0)])
def test_stats_rates_divide_by_the_span_the_samples_cover(rate, seconds):
    """A server started long ago (an idle minute) and ``seconds`` into a load test at
    ``rate`` req/s reports that rate, not the rate diluted over the whole window."""
    stats = WindowStats(window_s=60)
    now = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        t = now - seconds + i / rate
        stats.add("relu", Sample(t, 0.001, 0.0001, 0.0002, 1024, 1, 0, 1024))
    snap = stats.snapshot()["relu"]
    assert snap["requests"] == n
    assert snap["window_s"] == pytest.approx(seconds, rel=0.02)
    assert snap["requests_per_s"] == pytest.approx(rate, rel=0.02)
    assert snap["elements_per_s"] == pytest.approx(rate * 1024, rel=0.02)


def test_stats_span_is_at_least_a_second_and_at_most_the_window():
    stats = WindowStats(window_s=60)
    now = time.monotonic()
    stats.add("relu", Sample(now, 0.001, 0.0, 0.0, 8, 1, 0, 8))
    assert stats.snapshot()["relu"]["requests_per_s"] == pytest.approx(1.0, rel=0.01)
    old = WindowStats(window_s=5)
    for i in range(50):  # samples over 20 s; the window keeps the last 5 s
        old.add("relu", Sample(now - 20 + i * 0.4, 0.001, 0.0, 0.0, 8, 1, 0, 8))
    snap = old.snapshot()["relu"]
    assert snap["window_s"] <= 5.0 and snap["requests_per_s"] == pytest.approx(2.5, rel=0.15)
