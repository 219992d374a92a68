"""Custom activations are server-wide: registered on one connection, served by every
worker, with ``--workers 2`` (inline engines, files in the run directory),
``--engine process`` (one server process) and ``--workers 2 --engine process`` (the engine
process holds them). Real servers as child processes on 127.0.0.1; requests on fresh
connections (``Connection: close``) so the kernel spreads them over the workers. Answers
equal, bit for bit, the same composition applied to the request alone; killed workers and
a killed engine come back serving them."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import numpy as np
import pytest

from service.engine import custom
from service.engine.job import Mode
from service.engine.reference import reference
from service.engine.selftest import sample

from .conftest import same_bits, subprocess_server
from .test_workers import (
    get_fresh,
    pid_gone,
    restarted,
    run_dirs,
    status_or_none,
    wait_until,
    worker_pid,
)
from .test_workers_engine import engines

pytestmark = pytest.mark.slow

ELU = {"name": "w_elu", "expr": "x if x > 0 else alpha * (exp(x) - 1)",
       "params": {"alpha": {"default": 1.0, "min": 0, "max": 10}}}
FILE_GATE = {"name": "file_gate", "expr": "relu(x) * sigmoid(x)"}
FRESH = 12  # connections per check
X = sample(1000, "float32", 11)
MODES = {
    "workers-inline": {"ACTSERVE_WORKERS": "2", "ACTSERVE_ENGINE": "inline"},
    "engine-process": {"ACTSERVE_WORKERS": "1", "ACTSERVE_ENGINE": "process"},
    "workers-engine-process": {"ACTSERVE_WORKERS": "2", "ACTSERVE_ENGINE": "process"},
}


def lone(raw: dict, x: np.ndarray, params: dict | None = None) -> np.ndarray:
    act = custom.build(raw)
    return reference(act, act.parse_params(params or {}), x, "float32",
                     Mode(None, False, None, False))[0]


def post_fresh(url: str, name: str, params: dict | None = None) -> httpx.Response:
    query = {"shape": str(X.size), **{k: str(v) for k, v in (params or {}).items()}}
    return httpx.post(f"{url}/v1/activations/{name}", params=query, content=X.tobytes(),
                      timeout=60, headers={"content-type": "application/octet-stream",
                                           "connection": "close"})


def served_everywhere(url: str, raw: dict, params: dict | None = None) -> set[str]:
    """Every fresh connection answers bit for bit; the workers' request-id prefixes."""
    want = lone(raw, X, params)
    prefixes = set()
    for _ in range(FRESH):
        r = post_fresh(url, raw["name"], params)
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, "<f4"), want)
        prefixes.add(r.headers["x-request-id"].split("-")[0])
        listed = {a["name"] for a in get_fresh(url, "/v1/activations").json()["activations"]}
        assert raw["name"] in listed
    return prefixes


def ready(url: str) -> bool:
    r = status_or_none(url, "/readyz")
    return r is not None and r.status_code == 200


@pytest.fixture(scope="module", params=list(MODES))
def server(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("acts") / "acts.toml"
    path.write_text(f'[[activation]]\nname = "{FILE_GATE["name"]}"\nexpr = "{FILE_GATE["expr"]}"\n')
    env = {**MODES[request.param], "ACTSERVE_ACTIVATIONS_FILE": str(path),
           "ACTSERVE_MAX_DELAY_US": "200000", "ACTSERVE_MAX_BATCH_REQUESTS": "4",
           "ACTSERVE_ALLOW_PROFILE": "true"}
    with subprocess_server(env) as (proc, url):
        yield request.param, proc, url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert run_dirs(proc.pid) == []


def test_a_registration_is_served_by_every_worker(server):
    mode, _, url = server
    workers = int(MODES[mode]["ACTSERVE_WORKERS"])
    assert len(served_everywhere(url, FILE_GATE)) == workers  # the start-up file, everywhere
    # a bad expression is a 400 where it arrives, before anything is shared
    r = httpx.post(url + "/v1/activations", json={"name": "bad", "expr": "x + open(1)"})
    assert r.status_code == 400 and "open" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/activations", json=ELU, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == ELU["name"] and r.json()["custom"] is True
    assert len(served_everywhere(url, ELU, {"alpha": 0.25})) == workers
    for _ in range(4):  # taken on every worker
        r = httpx.post(url + "/v1/activations", json=ELU, timeout=60,
                       headers={"connection": "close"})
        assert r.status_code == 409, r.text


def test_a_killed_worker_comes_back_serving_it(server):
    mode, _, url = server
    if MODES[mode]["ACTSERVE_WORKERS"] == "1":
        pytest.skip("one server process: no supervisor restarts it")
    victim = worker_pid(url, 1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: pid_gone(victim), 30, "the worker's death")
    wait_until(lambda: restarted(url, 1, victim), 120, "worker 1 restarted")
    assert len(served_everywhere(url, ELU, {"alpha": 0.25})) == 2  # the new worker too
    served_everywhere(url, FILE_GATE)


def test_a_killed_engine_comes_back_serving_it(server):
    mode, proc, url = server
    if mode == "workers-inline":
        pytest.skip("no engine process")
    (engine,) = engines(proc.pid)
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: engines(proc.pid) and engines(proc.pid) != [engine], 60, "a new engine")
    wait_until(lambda: ready(url), 120, "ready again")
    served_everywhere(url, ELU, {"alpha": 0.25})  # re-registered by the workers
    served_everywhere(url, FILE_GATE)  # loaded again by the new engine


def test_inline_expressions_batch_in_the_engine(server):
    mode, _, url = server
    if mode == "workers-inline":
        pytest.skip("no engine process (inline expressions: tests/test_inline_expressions.py)")
    texts = ["x * sigmoid(1.702 * x)", "x*sigmoid(1.702*x)", "(x) * sigmoid(1.702 * (x))",
             "x * sigmoid(1.702*x)"]  # one normalized form: one activation, one batch

    async def run():
        limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection each
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post(
                "/v1/activations/expr", params={"shape": str(X.size), "expr": t},
                content=X.tobytes(), headers={"content-type": "application/octet-stream"})
                for t in texts))

    want = lone({"name": "q", "expr": texts[0]}, X)
    responses = asyncio.run(run())
    for r in responses:
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, "<f4"), want)
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    r = httpx.post(url + "/v1/activations/expr", json={"data": [1.0], "expr": "x + foo"})
    assert r.status_code == 400 and "foo" in r.json()["error"]["message"]


def test_delete_removes_it_everywhere(server):
    _, _, url = server
    assert httpx.delete(f"{url}/v1/activations/{ELU['name']}", timeout=60).status_code == 204
    for _ in range(FRESH):
        assert post_fresh(url, ELU["name"]).status_code == 404
        assert get_fresh(url, f"/v1/activations/{ELU['name']}").status_code == 404
    assert httpx.delete(f"{url}/v1/activations/{ELU['name']}").status_code == 404
    # registered again after the delete: served everywhere again
    assert httpx.post(url + "/v1/activations", json=ELU, timeout=60).status_code == 201
    served_everywhere(url, ELU)


def test_a_profile_trace_downloads_from_any_worker(server):
    """A profiled request (docs/lab.md) runs on one worker (or in the engine process); its
    Chrome trace downloads on every fresh connection, whichever worker takes it."""
    mode, _, url = server
    r = httpx.post(url + "/v1/activations/tanh", json={"data": [0.5] * 100,
                                                       "report": ["profile"]}, timeout=60)
    assert r.status_code == 200, r.text
    path = r.json()["report"]["profile"]["trace_url"]
    prefixes = set()
    for _ in range(FRESH):
        got = get_fresh(url, path)
        assert got.status_code == 200 and "traceEvents" in got.json()
        prefixes.add(got.headers["x-request-id"].split("-")[0])
    assert len(prefixes) == int(MODES[mode]["ACTSERVE_WORKERS"])  # every worker served it
