"""``--workers N --engine process``: N HTTP workers in front of one engine process, started
by the supervisor. Real servers as child processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.engine.ipc import arena

from .conftest import same_bits, subprocess_server
from .test_workers import (
    exact_silu_answers,
    pid_gone,
    post_fresh,
    post_silu_all,
    restarted,
    run_dirs,
    status_or_none,
    wait_until,
    worker_pid,
)

pytestmark = pytest.mark.slow


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append((int(entry.name), cmd))
    return out


def engines(pid: int) -> list[int]:
    return [p for p, cmd in children(pid) if "service.engine.ipc.host" in cmd]


def arenas(root: int, also: set[int] | frozenset = frozenset()) -> set[str]:
    """The engine arenas in /dev/shm made by ``root``, its descendants or the processes
    ``also`` names (by the creator's pid in the name), so that the servers of other tests
    running at the same time are not counted."""
    tree, todo = {root, *also}, [root]
    while todo:
        kids = [pid for pid, _ in children(todo.pop())]
        tree.update(kids)
        todo.extend(kids)
    names = (p.name for p in arena.SHM_DIR.glob(arena.PREFIX + "*") if p.is_file())
    return {n for n in names if n[len(arena.PREFIX):].split("-")[0] in {str(p) for p in tree}}


ENV = {"ACTSERVE_WORKERS": "2", "ACTSERVE_ENGINE": "process"}


@pytest.fixture(scope="module")
def server():
    env = {**ENV, "ACTSERVE_MAX_DELAY_US": "300000", "ACTSERVE_MAX_BATCH_REQUESTS": "16"}
    with subprocess_server(env) as (proc, url):
        yield proc, url, int(url.rsplit(":", 1)[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert run_dirs(proc.pid) == []


def test_one_engine_batches_the_requests_of_every_worker(server):
    proc, url, _ = server
    assert len(engines(proc.pid)) == 1
    xs = [np.full(100 + i, i - 8, dtype="<f4") for i in range(16)]

    async def run():
        limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection each
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post(
                "/v1/activations/relu", params={"shape": str(x.size)}, content=x.tobytes(),
                headers={"content-type": "application/octet-stream"}) for x in xs))

    responses = asyncio.run(run())
    for x, r in zip(xs, responses, strict=True):
        assert r.status_code == 200
        assert same_bits(np.frombuffer(r.content, "<f4"), np.maximum(x, 0))
    # each worker makes request ids with a prefix of its own: both workers answered ...
    assert len({r.headers["x-request-id"].split("-")[0] for r in responses}) == 2
    # ... and the engine put their requests into the same batches
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > max(sum(1 for r in responses if r.headers["x-request-id"].split("-")[0]
                                == prefix) for prefix in {r.headers["x-request-id"].split("-")[0]
                                                          for r in responses})


def test_killed_workers_leave_no_shared_memory_behind(server):
    proc, url, port = server
    before = arenas(proc.pid)
    assert len(before) >= 2  # one arena per worker
    victims: set[int] = set()
    for _ in range(5):
        victim = worker_pid(url, 1)
        victims.add(victim)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda v=victim: pid_gone(v), 30, "the worker's death")
        wait_until(lambda v=victim: restarted(url, 1, v), 120, "worker 1 restarted")
        assert post_fresh(port)[0] == 200
        # the dead worker's arena is gone (the engine unlinks it when it sees the worker go)
        # (counted with the dead workers' pids, so an arena left behind by one would show)
        wait_until(lambda: len(arenas(proc.pid, victims)) == len(before), 30,
                   lambda: f"arenas {arenas(proc.pid, victims)}")
    assert len(engines(proc.pid)) == 1


def test_killed_engine_answers_503_then_the_supervisor_restarts_it(server):
    proc, url, port = server
    (engine,) = engines(proc.pid)
    os.kill(engine, signal.SIGSTOP)  # nothing is computed from here on
    results: list = []

    async def run():
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/activations/relu", json={"data": [1.0]}))
                     for _ in range(4)]
            deadline = time.monotonic() + 30
            while (await c.get("/v1/stats")).json()["queue_depth"] < 4:
                assert time.monotonic() < deadline, "requests never reached the engine"
            os.kill(engine, signal.SIGKILL)
            results.extend(await asyncio.gather(*tasks))

    asyncio.run(run())
    assert [r.status_code for r in results] == [503] * 4
    assert all(r.headers.get("retry-after") for r in results)
    wait_until(lambda: engines(proc.pid) and engines(proc.pid) != [engine], 60, "a new engine")
    wait_until(lambda: (r := status_or_none(url, "/readyz")) is not None
               and r.status_code == 200, 120, "ready again")
    assert post_fresh(port)[0] == 200


def test_sigterm_drains_workers_then_the_engine():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(500 + 10 * i).astype("<f4") for i in range(16)]
    with subprocess_server(ENV) as (proc, url):
        (engine,) = engines(proc.pid)
        os.kill(engine, signal.SIGSTOP)  # requests pile up at the engine until SIGCONT

        async def run():
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
                tasks = post_silu_all(c, xs)
                deadline = time.monotonic() + 30
                while (await c.get("/v1/stats")).json()["queue_depth"] < 8:
                    assert time.monotonic() < deadline
                proc.send_signal(signal.SIGTERM)
                os.kill(engine, signal.SIGCONT)  # the workers drain on the engine's answers
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        assert proc.wait(90) == 0
    assert exact_silu_answers(xs, results) >= 8  # every request the engine held
    assert pid_gone(engine)
    assert run_dirs(proc.pid) == []
