"""Log lines: ``log_format`` applies to uvicorn's own lines as well as the access log, and
the access log, written off the event loop in batches, loses no line on SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys

import httpx
import orjson
import pytest

from service.observability.logs import AccessLog, LineFormatter, format_access

from .conftest import subprocess_server


def _run_and_stop(env: dict, requests: int) -> list[str]:
    with subprocess_server({"ACTSERVE_ACCESS_LOG": "true", **env}) as (proc, url):
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(requests):
                r = c.post("/v1/activations/relu", json={"data": [1.0, -1.0]},
                           headers={"x-request-id": f"req-{i}"})
                assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)  # at once: lines may still be queued
        assert proc.wait(60) == 0
        return proc.log_path.read_text().splitlines()


@pytest.mark.slow
def test_json_format_covers_uvicorn_lines_and_loses_no_access_line_on_sigterm():
    lines = _run_and_stop({"ACTSERVE_LOG_FORMAT": "json"}, 200)
    parsed = [orjson.loads(line) for line in lines]  # every line is JSON, uvicorn's included
    messages = [p.get("message", "") for p in parsed]
    assert any("Uvicorn running on" in m for m in messages), lines[:5]
    assert any("Shutting down" in m for m in messages)
    for p in parsed:
        if "message" in p:
            assert {"ts", "level", "logger"} <= set(p)
    ids = [p["id"] for p in parsed if str(p.get("id")).startswith("req-")]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(200))  # each exactly once


@pytest.mark.slow
def test_text_format_has_no_json_lines():
    lines = _run_and_stop({"ACTSERVE_LOG_FORMAT": "text"}, 3)
    assert not any(line.lstrip().startswith("{") for line in lines), lines
    assert any("INFO uvicorn.error: Uvicorn running on" in line for line in lines), lines
    access = [line for line in lines if line.startswith("req-")]
    assert len(access) == 3
    assert " POST /v1/activations/relu 200 " in access[0] and "shape=2" in access[0]


def test_access_log_close_writes_every_queued_line_in_batches(caplog):
    caplog.set_level(logging.INFO, logger="actserve.access")
    log = AccessLog("json")
    for i in range(500):  # queued before the writer starts: they must all come out
        log.write({"id": str(i), "status": 200})
    log.start()
    log.close()
    records = [r for r in caplog.records if r.name == "actserve.access"]
    lines = [orjson.loads(x) for r in records for x in r.getMessage().splitlines()]
    assert [x["id"] for x in lines] == [str(i) for i in range(500)]
    assert len(records) < 500 and log.written == 500 and log.dropped == 0


def test_a_full_queue_drops_and_counts_instead_of_waiting(caplog):
    caplog.set_level(logging.INFO, logger="actserve")
    log = AccessLog("json", max_pending=10)  # writer not started: nothing drains
    for i in range(25):
        log.write({"id": str(i)})
    assert log.dropped == 15
    log.start()
    log.close()
    assert log.written == 10
    assert any("15 lines dropped" in r.getMessage() for r in caplog.records)


def test_formats():
    line = {"id": "a", "method": "GET", "path": "/x", "status": 200, "ms": 1.5, "shape": [2, 3],
            "amp": False}
    assert orjson.loads(format_access(line, "json")) == line
    assert format_access(line, "text") == "a GET /x 200 1.5ms shape=2,3 amp=false"
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "hello %s", ("you",),
                               None)
    out = orjson.loads(LineFormatter("json").format(record))
    assert out["message"] == "hello you" and out["level"] == "info" and out["ts"].endswith("Z")
    assert LineFormatter("text").format(record).endswith("INFO uvicorn.error: hello you")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in orjson.loads(LineFormatter("json").format(record))["exc"]


def test_sink_gets_one_write_per_batch_in_either_format():
    writes: list[bytes] = []
    log = AccessLog("text", sink=writes.append)
    log.start()
    for i in range(100):
        log.write({"id": f"r{i}", "method": "GET", "path": "/healthz", "status": 200, "ms": 0.1})
    log.close()
    lines = b"".join(writes).decode().splitlines()
    assert lines == [f"r{i} GET /healthz 200 0.1ms" for i in range(100)]
    assert len(writes) < 100
