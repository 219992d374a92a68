"""The Prometheus and Grafana provisioning under ``deploy/``, checked by the real tools:
``promtool`` validates the config and rules, a real Prometheus (Debian's ``prometheus``
package; ``.ci/run`` installs it) scrapes a running server and its query API returns the
request count this test sent, and every dashboard query runs on it.

Without the binaries these tests skip locally; in CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import free_port, stop_process, wait_ready

from .conftest import ROOT, serve

PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "actserve.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"]]
    assert exprs
    return exprs


def instant(expr: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana fills in its variables."""
    return expr.replace("$__rate_interval", "1m").replace("$activation", ".*")


# -- static checks ----------------------------------------------------------------------
def test_promtool_checks_config_and_rules():
    promtool = tool("promtool")
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROM_DIR / "rules.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout + r.stderr


def test_dashboard_json_is_generated_from_its_source():
    module = runpy.run_path(str(GRAFANA_DIR / "dashboard.py"))
    assert DASHBOARD.read_text() == module["render"](), (
        "regenerate: python deploy/grafana/dashboard.py > deploy/grafana/dashboards/actserve.json")


def test_dashboard_and_rules_name_only_metrics_the_server_exports(client):
    assert client.post("/v1/activations/relu", json={"data": [1.0]}).status_code == 200
    exported = set()
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        exported.update(s.name for s in fam.samples)
        exported.add(fam.name)
        if fam.type in ("counter",):
            exported.add(fam.name + "_total")
        if fam.type == "histogram":
            exported.update(fam.name + sfx for sfx in ("_bucket", "_sum", "_count"))
    texts = [*dashboard_queries(), (PROM_DIR / "rules.yml").read_text()]
    used = {m for text in texts for m in re.findall(r"\b(?:actserve|process)_[a-z_]+\b", text)}
    assert used and used <= exported, sorted(used - exported)
    # the panels the issue asks for
    joined = "\n".join(dashboard_queries())
    for metric in ("actserve_request_duration_seconds_bucket", "actserve_requests_total",
                   "actserve_batch_size_requests_sum", "actserve_queue_depth",
                   "actserve_rejections_total"):
        assert metric in joined, metric


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    board = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    source = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert uids == {"actserve-prometheus"} and "uid: actserve-prometheus" in source
    assert "url: http://prometheus:9090" in source
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "actserve.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    titles = {p["title"] for p in board["panels"]}
    assert {"Request latency", "Requests per second", "Mean batch size (requests)",
            "Queue depth and in-flight requests", "Rejections by reason"} <= titles


# -- a real Prometheus ---------------------------------------------------------------------
@contextmanager
def prometheus(tmp_path: Path, target: str):
    binary = tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {PROM_DIR / 'rules.yml'}\n"
        "scrape_configs:\n  - job_name: actserve\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url + "/-/ready", 60, "prometheus",
                   lambda: (tmp_path / "prometheus.log").read_text())
        yield url
    finally:
        stop_process(proc, 30)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def query_until(url: str, expr: str, want: float, timeout: float = 60.0) -> float:
    """Poll until Prometheus has scraped the value ``want`` (it scrapes every second)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        result = query(url, expr)
        seen = float(result[0]["value"][1]) if result else None
        if seen == want:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{expr} = {seen}, expected {want}")


@pytest.mark.slow
def test_real_prometheus_scrapes_the_request_count(tmp_path):
    tool("prometheus")
    with serve() as srv, prometheus(tmp_path, f"127.0.0.1:{srv.port}") as prom, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        for i in range(7):
            assert c.post("/v1/activations/relu", json={"data": [float(i)]}).status_code == 200
        for _ in range(3):
            assert c.post("/v1/activations/sigmoid", json={"data": [1.0, 2.0]}).status_code == 200
        assert c.post("/v1/activations/relu", json={"data": "bad"}).status_code == 400
        query_until(prom, 'sum(actserve_requests_total{job="actserve",status_class="2xx"})', 10)
        query_until(prom, 'actserve_requests_total{activation="relu",status_class="2xx"}', 7)
        query_until(prom, 'actserve_rejections_total{reason="invalid"}', 1)
        query_until(prom, 'sum(actserve_request_duration_seconds_count{activation="sigmoid"})', 3)
        query_until(prom, 'up{job="actserve"}', 1)
        # every dashboard query is valid PromQL on this Prometheus; the core ones have data
        for expr in dashboard_queries():
            if expr.startswith("label_values"):
                continue
            query(prom, instant(expr))
        query_until(prom, 'count(activation:actserve_requests:rate1m)', 3)  # relu 2xx/4xx, sigmoid
        assert query(prom, instant(dashboard_queries()[0]))
