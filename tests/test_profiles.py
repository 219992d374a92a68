"""Profiles (docs/lab.md): a request run alone under torch.profiler, its operator table and
a downloadable Chrome trace; off unless the server allows it."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from service.http.traces import ProfileTraces

from .conftest import reference, same_bits, serve
from .gates import held


@pytest.fixture(scope="module")
def profiling_server():
    with serve(allow_profile=True, profile_trace_ttl_s=60) as srv:
        yield srv


def test_profile_table_and_trace(profiling_server):
    x = np.linspace(-4, 4, 50_000, dtype=np.float32)
    with httpx.Client(base_url=profiling_server.url, timeout=60) as c:
        r = c.post("/v1/activations/elu", json={"data": x.tolist(), "report": ["profile"],
                                                "outputs": ["value", "grad"]})
        assert r.status_code == 200, r.text
        prof = r.json()["report"]["profile"]
        names = [row["name"] for row in prof["operators"]]
        assert "aten::elu" in names and any("EluBackward" in n for n in names)
        row = prof["operators"][names.index("aten::elu")]
        assert row["calls"] == 1 and row["self_cpu_us"] > 0
        assert prof["device"] == "cpu"
        trace = c.get(prof["trace_url"])
        assert trace.status_code == 200
        events = trace.json()["traceEvents"]
        assert any(e.get("name") == "aten::elu" for e in events)
        value, _ = reference("elu", x, "float32")
        assert np.array_equal(np.array(r.json()["data"], np.float32), value)
        assert c.get("/v1/profiles/not-a-trace").status_code == 404


def test_profiled_request_runs_alone_in_its_batch(profiling_server):
    """A profiled request held in a batch with plain ones: its table shows one call of the
    activation (its own), and the others' answers are unaffected."""
    xs = [np.full(n, 0.5, np.float32) for n in (10, 1000, 20_000)]

    async def run():
        async with httpx.AsyncClient(base_url=profiling_server.url, timeout=60) as c:
            async with held(profiling_server.engine, 3):
                tasks = [asyncio.ensure_future(c.post(
                    "/v1/activations/sigmoid", content=x.tobytes(),
                    params={"shape": str(x.size), **({"report": "profile"} if i == 1 else {})},
                    headers={"content-type": "application/octet-stream"}))
                    for i, x in enumerate(xs)]
            return [await t for t in tasks]

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert int(responses[1].headers["x-batch-size"]) >= 2
    parts = responses[1].headers["x-outputs"].split(",")
    assert parts == ["value", "profile"]
    size = [int(b) for b in responses[1].headers["x-output-bytes"].split(",")]
    prof = json.loads(responses[1].content[size[0]:])
    calls = {row["name"]: row["calls"] for row in prof["operators"]}
    assert calls["aten::sigmoid"] == 1
    for x, r in zip(xs, responses, strict=True):
        want, _ = reference("sigmoid", x, "float32")
        assert same_bits(np.frombuffer(r.content[:x.nbytes], np.float32), want)


def test_profiles_are_off_by_default(app_client):
    r = app_client.post("/v1/activations/relu", json={"data": [1.0], "report": ["profile"]})
    assert r.status_code == 400
    assert "ACTSERVE_ALLOW_PROFILE" in r.json()["error"]["message"]


def test_traces_expire_and_are_bounded():
    now = [0.0]
    traces = ProfileTraces(ttl_s=10, max_traces=2, clock=lambda: now[0])
    a = traces.put(b"a")
    b = traces.put(b"b")
    assert traces.get(a) == b"a" and traces.get(b) == b"b"
    c = traces.put(b"c")  # over the count: the oldest goes
    assert traces.get(a) is None and traces.get(c) == b"c" and len(traces) == 2
    now[0] = 10.5
    assert traces.get(b) is None and traces.get(c) is None and len(traces) == 0


def test_traces_as_files_expire_and_are_bounded(tmp_path):
    now = [1000.0]
    traces = ProfileTraces(ttl_s=10, max_traces=2, clock=lambda: now[0], directory=tmp_path)
    a = traces.put(b"a")
    now[0] += 1
    b = traces.put(b"b")
    other = ProfileTraces(ttl_s=10, max_traces=2, clock=lambda: now[0], directory=tmp_path)
    assert other.get(a) == b"a" and other.get(b) == b"b"  # another worker sees them
    now[0] += 1
    c = traces.put(b"c")
    assert other.get(a) is None and other.get(c) == b"c" and len(other) == 2
    assert other.get("../../etc/passwd") is None
    now[0] += 20
    assert other.get(b) is None and len(traces) == 0


def test_an_engine_process_trace_too_big_for_a_control_message_is_dropped_with_a_note():
    """The engine process passes a profile's trace on its "done" message: one over the
    message limit is replaced by a note, so the connection (and every request on it) is
    never put at risk; a small one travels as text."""
    from service.engine.ipc import channel
    from service.engine.reports import to_channel as _reports_out

    big = {"profile": {"operators": [], "trace": b"x" * (channel.MAX_TRACE + 1)}}
    out = _reports_out(big)["profile"]
    assert out["trace"] is None and "--engine inline" in out["trace_note"]
    assert len(channel.pack(["done", 1, out])) < channel.MAX_MESSAGE
    small = _reports_out({"profile": {"operators": [], "trace": b'{"traceEvents": []}'}})
    assert small["profile"]["trace"] == '{"traceEvents": []}'
