"""``--log-format json``: every line the server writes is one JSON object, including Python
warnings (routed through logging) and what C++ code writes straight to file descriptor 2
(the profiler's own lines), captured and re-emitted (``service/observability/logs.py``)."""

from __future__ import annotations

import json

import httpx

from .conftest import subprocess_server


def test_every_line_in_json_mode_parses_with_a_torch_warning_and_a_profile():
    env = {"ACTSERVE_LOG_FORMAT": "json", "ACTSERVE_ALLOW_PROFILE": "true",
           "ACTSERVE_FAULT_INJECTION": "true", "ACTSERVE_GRPC_PORT": "0"}
    with subprocess_server(env) as (proc, url), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/activations/gelu", json={"data": [1.0, -2.0], "report": ["profile"]})
        assert r.status_code == 200, r.text
        assert "profile" in r.json()["report"]
        r = c.post("/v1/activations/tanh", json={"data": [0.5]},
                   headers={"x-actserve-fault": "torch_warning"})
        assert r.status_code == 200, r.text
    text = proc.log_path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
    assert all(isinstance(p, dict) for p in parsed)
    warnings = [p for p in parsed if p.get("logger") == "py.warnings"]
    assert any("autocast" in p["message"] for p in warnings), parsed
    captured = [p for p in parsed if p.get("logger") == "stderr"]
    assert any("profiler" in p["message"] for p in captured), parsed  # the C++ profiler's lines
