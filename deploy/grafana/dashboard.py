"""Builds ``dashboards/actserve.json``, the Grafana dashboard for actserve.

Edit the panels here and regenerate::

    python deploy/grafana/dashboard.py > deploy/grafana/dashboards/actserve.json

The test suite checks that the committed JSON matches this file, that every query names
metrics the server exports, and that a real Prometheus accepts every query.
"""

from __future__ import annotations

import json
import sys

DATASOURCE = {"type": "prometheus", "uid": "actserve-prometheus"}
SEL = 'activation=~"$activation"'
RI = "$__rate_interval"


def _quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
         f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
        for q in (0.5, 0.9, 0.99)
    ]


# (title, unit, [(expr, legend)], width, description)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int, str]]]] = [
    ("Traffic", [
        ("Requests per second", "reqps", [
            (f"sum by (activation, status_class) (rate(actserve_requests_total{{{SEL}}}[{RI}]))",
             "{{activation}} {{status_class}}"),
        ], 8, "Answered activation requests by activation and status class"),
        ("Elements per second", "short", [
            (f"sum by (activation) (rate(actserve_batch_size_elements_sum{{{SEL}}}[{RI}]))",
             "{{activation}}"),
        ], 8, "Tensor elements computed per second"),
        ("Bytes in / out", "Bps", [
            (f"sum(rate(actserve_request_bytes_total[{RI}]))", "in"),
            (f"sum(rate(actserve_response_bytes_total[{RI}]))", "out"),
        ], 8, "Request and response body bytes per second"),
    ]),
    ("Latency", [
        ("Request latency", "s", _quantiles("actserve_request_duration_seconds"), 8,
         "Request time from body read to response, all activations selected"),
        ("Queue wait", "s", _quantiles("actserve_queue_wait_seconds"), 8,
         "Time requests waited for their batch to start"),
        ("Compute per batch", "s", _quantiles("actserve_compute_seconds"), 8,
         "Compute time of a batch (CUDA events on GPU, thread wall time on CPU)"),
        ("p99 latency by activation", "s",
         [(f"histogram_quantile(0.99, sum by (le, activation) "
           f"(rate(actserve_request_duration_seconds_bucket{{{SEL}}}[{RI}])))", "{{activation}}")],
         12, "99th percentile request latency per activation"),
        ("Decode / encode p99", "s", [
            (f"histogram_quantile(0.99, sum by (le, api) (rate(actserve_decode_seconds_bucket[{RI}])))",
             "decode {{api}}"),
            (f"histogram_quantile(0.99, sum by (le, api) (rate(actserve_encode_seconds_bucket[{RI}])))",
             "encode {{api}}"),
        ], 12, "Body decode/validation and response encode time"),
    ]),
    ("Batching", [
        ("Mean batch size (requests)", "short", [
            (f"sum by (activation) (rate(actserve_batch_size_requests_sum{{{SEL}}}[{RI}])) / "
             f"sum by (activation) (rate(actserve_batch_size_requests_count{{{SEL}}}[{RI}]))",
             "{{activation}}"),
        ], 8, "Requests per executed batch"),
        ("Mean batch size (elements)", "short", [
            (f"sum by (activation) (rate(actserve_batch_size_elements_sum{{{SEL}}}[{RI}])) / "
             f"sum by (activation) (rate(actserve_batch_size_elements_count{{{SEL}}}[{RI}]))",
             "{{activation}}"),
        ], 8, "Elements per executed batch"),
        ("Batches per second", "ops", [
            (f"sum by (activation, device) (rate(actserve_batches_total{{{SEL}}}[{RI}]))",
             "{{activation}} {{device}}"),
        ], 8, "Batches executed per second"),
        ("Queue depth and in-flight requests", "short", [
            ("sum(actserve_queue_depth)", "queue depth"),
            ("sum(actserve_inflight_requests)", "in flight"),
        ], 12, "Requests waiting for a batch, and requests being handled"),
        ("In-place memory saved", "Bps", [
            (f"sum(rate(actserve_inplace_saved_bytes_total[{RI}]))", "saved"),
        ], 12, "Output allocations avoided by in-place computation, bytes per second"),
    ]),
    ("Errors and health", [
        ("Rejections by reason", "reqps", [
            (f"sum by (reason) (rate(actserve_rejections_total[{RI}]))", "{{reason}}"),
        ], 8, "Refused requests: queue_full, deadline, invalid, ..."),
        ("Error ratio", "percentunit", [
            (f'sum(rate(actserve_requests_total{{status_class=~"4xx|5xx"}}[{RI}])) / '
             f"sum(rate(actserve_requests_total[{RI}]))", "errors / requests"),
        ], 8, "Share of requests not answered 2xx"),
        ("Ready, executor restarts", "short", [
            ("min(actserve_ready)", "ready"),
            ("sum(actserve_executor_restarts_total)", "restarts"),
        ], 8, "1 when every replica accepts work; compute executors restarted"),
        ("GPU memory", "bytes", [
            ("sum by (device) (actserve_gpu_memory_allocated_bytes)", "allocated {{device}}"),
            ("sum by (device) (actserve_gpu_memory_peak_bytes)", "peak {{device}}"),
        ], 12, "torch.cuda allocated and peak memory (empty on CPU-only servers)"),
        ("Process CPU and memory", "short", [
            (f"sum(rate(process_cpu_seconds_total{{job=\"actserve\"}}[{RI}]))", "CPU cores"),
            ("sum(process_resident_memory_bytes{job=\"actserve\"}) / 2^30", "RSS GiB"),
        ], 12, "Server process CPU (cores busy) and resident memory (GiB)"),
    ]),
]


def build() -> dict:
    panels: list[dict] = []
    y = 0
    pid = 1
    for row_title, row in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        x = 0
        for title, unit, queries, width, description in row:
            if x + width > 24:
                x, y = 0, y + 8
            panels.append({
                "type": "timeseries",
                "title": title,
                "description": description,
                "id": pid,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [
                    {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(queries)
                ],
            })
            pid += 1
            x += width
        y += 8
    return {
        "uid": "actserve",
        "title": "actserve",
        "description": "Latency, throughput, batching, queue and errors of actserve",
        "tags": ["actserve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "templating": {"list": [{
            "name": "activation",
            "label": "activation",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": "label_values(actserve_requests_total, activation)",
                      "refId": "activation"},
            "definition": "label_values(actserve_requests_total, activation)",
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
