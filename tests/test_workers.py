"""``actserve serve --workers N``: a supervisor and N HTTP worker processes on one port.

Real servers, as child processes on 127.0.0.1: the numbers of every worker in one
``/metrics``, ``/v1/stats`` and ``/v2/models/stats``; readiness true only when every worker
is; a worker SIGKILLed under load restarted while the other serves; SIGTERM under load
answering every accepted request; nothing left in ``/dev/shm`` after shutdown, and what a
killed server left cleaned at the next start.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.exposition import generate_latest

from service.cores import usable_cores
from service.process import merge, wire
from service.process.rundir import base_dir
from service.settings import Settings

from .conftest import ROOT, free_port, reference, same_bits, subprocess_server

X = np.linspace(-2, 2, 1024, dtype="<f4")
RELU_X = np.maximum(X, 0)


def post_fresh(port: int, x: np.ndarray = X, timeout: float = 30) -> tuple[int, bytes]:
    """One request on a new connection (so the kernel picks a worker for it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/activations/relu?shape={x.size}", body=x.tobytes(),
                     headers={"content-type": "application/octet-stream"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_fresh(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, timeout=30, headers={"connection": "close"})


def status_or_none(url: str, path: str) -> httpx.Response | None:
    """A probe while a worker dies: a connection the kernel had queued on the dead worker's
    socket is reset (a client sees that as for any lost replica)."""
    try:
        return get_fresh(url, path)
    except httpx.TransportError:
        return None


def requests_total(metrics_text: str) -> float:
    return sum(float(m) for m in re.findall(
        r'^actserve_requests_total\{activation="relu",api="native",status_class="2xx"\} (\S+)',
        metrics_text, re.M))


def run_dirs(pid: int) -> list[Path]:
    return [p for p in base_dir().iterdir() if p.name.startswith(f"actserve-{pid}-")]


def worker_pid(url: str, slot: int) -> int | None:
    """The pid /v1/stats reports for worker ``slot``; None while that worker is missing
    from the answer (dead, restarting, or too slow to answer its peer)."""
    r = status_or_none(url, "/v1/stats")
    if r is None or r.status_code != 200 or not r.json()["ready"]:
        return None
    return next((w["pid"] for w in r.json()["workers"] if w["slot"] == slot), None)


def restarted(url: str, slot: int, old_pid: int) -> bool:
    """The server is ready and worker ``slot`` answers with a pid other than ``old_pid``."""
    pid = worker_pid(url, slot)
    return pid is not None and pid != old_pid


def wait_until(predicate, timeout: float, what):
    """Poll ``predicate`` until it is true (bounded); ``what``: a text, or a function giving
    one at the time of the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def post_silu_all(client: httpx.AsyncClient, xs: list[np.ndarray]) -> list[asyncio.Future]:
    """silu of every ``x`` as binary requests, started at once."""
    return [asyncio.ensure_future(client.post(
        "/v1/activations/silu", params={"shape": str(x.size)}, content=x.tobytes(),
        headers={"content-type": "application/octet-stream"})) for x in xs]


def exact_silu_answers(xs: list[np.ndarray], results: list) -> int:
    """How many of ``post_silu_all``'s requests were answered, each bit for bit the
    reference; the others were never accepted (the listeners closed) or refused with 503."""
    answered = 0
    for x, r in zip(xs, results, strict=True):
        if isinstance(r, httpx.TransportError):
            continue  # never accepted: the listeners were closed
        assert not isinstance(r, BaseException), r
        if r.status_code == 503:
            continue  # refused while draining
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, "<f4"), reference("silu", x, "float32")[0])
        answered += 1
    return answered


class Load:
    """Threads posting on fresh connections until stopped (bounded by ``limit_s``)."""

    def __init__(self, port: int, threads: int = 3, limit_s: float = 120) -> None:
        self.port = port
        self.stop = threading.Event()
        self.ok: list[float] = []  # completion times of correct answers
        self.failed = 0
        self.wrong = 0
        self.deadline = time.monotonic() + limit_s
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                status, body = post_fresh(self.port, timeout=10)
            except (OSError, http.client.HTTPException):  # a connection of the dead worker
                self.failed += 1
                continue
            if status == 200 and same_bits(np.frombuffer(body, "<f4"), RELU_X):
                self.ok.append(time.monotonic())
            elif status == 503:
                self.failed += 1
            else:
                self.wrong += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture(scope="module")
def two_workers():
    """(process, url, port, probe port url): the supervisor serves the probe port."""
    port, probes = free_port(), free_port()
    with subprocess_server({"ACTSERVE_WORKERS": "2", "ACTSERVE_PROBE_PORT": str(probes),
                            "ACTSERVE_PROBE_STALL_S": "2"}, port=port) as (proc, url):
        yield proc, url, port, f"http://127.0.0.1:{probes}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert run_dirs(proc.pid) == []


# -- settings ---------------------------------------------------------------------------------
def test_workers_setting_takes_a_count_or_auto():
    assert Settings(workers="3").worker_count == 3
    assert Settings().worker_count == 1
    assert 1 <= Settings(workers="auto").worker_count <= len(os.sched_getaffinity(0))
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="ACTSERVE_WORKERS"):
            Settings(workers=bad)


def test_auto_is_the_cores_within_the_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(cpu_max) == affinity  # no cgroup file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: one worker
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * affinity + 1} 100000\n")  # more than the mask
    assert usable_cores(cpu_max) == affinity


def test_cli_names_a_bad_worker_count():
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--workers", "zero"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "workers (ACTSERVE_WORKERS)" in r.stderr


@pytest.mark.slow  # several server processes
def test_one_worker_is_one_process_without_a_supervisor():
    with subprocess_server({"ACTSERVE_WORKERS": "1"}) as (proc, url):
        children = [c for t in Path(f"/proc/{proc.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        assert children == []  # the server itself, no worker processes
        assert run_dirs(proc.pid) == []
        stats = get_fresh(url, "/v1/stats").json()
        assert "workers" not in stats and stats["ready"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


@pytest.mark.slow  # several server processes
def test_a_worker_that_cannot_start_stops_the_server_cleanly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the failure is a missing device)")
    # gRPC off: another test's server checking the default gRPC port at the same moment
    # would make this one fail on that port instead of on the device
    r = subprocess.run([sys.executable, "-m", "service", "serve", "--workers", "2", "--port", "0",
                        "--grpc-port", "0", "--device", "cuda:0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 1
    assert "CUDA is not available" in r.stderr and "before the server was ready" in r.stderr
    pid = int(re.search(r"supervisor \(pid (\d+)\)", r.stderr).group(1))
    assert run_dirs(pid) == []


# -- one server in the numbers ----------------------------------------------------------------
@pytest.mark.slow  # several server processes
def test_numbers_from_any_worker_cover_every_worker(two_workers):
    _, url, port, _ = two_workers
    before = get_fresh(url, "/v1/stats").json()
    base_total = requests_total(get_fresh(url, "/metrics").text)
    base_v2 = get_fresh(url, "/v2/models/relu/stats").json()["model_stats"][0]
    base_stats = before["activations"].get("relu", {}).get("requests", 0)
    n = 40  # on fresh connections: the kernel spreads them over both workers
    for _ in range(n):
        status, body = post_fresh(port)
        assert status == 200
        assert same_bits(np.frombuffer(body, "<f4"), reference("relu", X, "float32")[0])
    for _ in range(4):  # each scrape lands on either worker; every one sees all of them
        text = get_fresh(url, "/metrics").text
        assert requests_total(text) == base_total + n
        assert re.search(r'^actserve_ready\{worker="0"\} 1\.0$', text, re.M)
        assert re.search(r'^actserve_ready\{worker="1"\} 1\.0$', text, re.M)
        assert re.search(r'^process_resident_memory_bytes\{worker="1"\} ', text, re.M)
        assert "# TYPE actserve_request_duration_seconds histogram" in text
        count = re.search(r'^actserve_request_duration_seconds_count\{activation="relu",'
                          r'api="native",status_class="2xx"\} (\S+)', text, re.M)
        assert float(count.group(1)) == base_total + n
        stats = get_fresh(url, "/v1/stats").json()
        assert stats["activations"]["relu"]["requests"] == base_stats + n
        assert [w["slot"] for w in stats["workers"]] == [0, 1]
        assert len({w["pid"] for w in stats["workers"]}) == 2 and stats["ready"] is True
        # a front end's limits for both workers' queues (merged: front_limits.merged)
        front = stats["overload"]["front_limits"]
        assert front["small"]["workers_measured"] in (0, 1, 2), front
        assert all("front_limits" not in w for w in stats["workers"])
        v2 = get_fresh(url, "/v2/models/relu/stats").json()["model_stats"][0]
        assert v2["inference_count"] == base_v2["inference_count"] + n
        assert v2["inference_stats"]["success"]["count"] == \
            base_v2["inference_stats"]["success"]["count"] + n


@pytest.mark.slow  # several server processes
def test_port_of_a_running_server_is_refused_to_another(two_workers):
    _, _, port, _ = two_workers
    for workers in ("2", "1"):
        r = subprocess.run([sys.executable, "-m", "service", "serve", "--workers", workers,
                            "--port", str(port), "--grpc-port", "0"], cwd=ROOT,
                           capture_output=True, text=True,
                           timeout=120, env={**os.environ, "ACTSERVE_LOG_LEVEL": "warning"})
        assert r.returncode != 0
        assert "in use" in r.stderr


# -- faults -----------------------------------------------------------------------------------
@pytest.mark.slow  # several server processes
def test_the_supervisors_probe_port_sees_a_worker_whose_loop_stopped(two_workers):
    """A worker stopped (SIGSTOP: its loop runs nothing, as when wedged) keeps its ready
    flag, but its heartbeat ages: past probe_stall_s (2 s here) the supervisor's probe port
    fails /healthz and /readyz naming it, and passes again once it runs."""
    _, url, _, probes = two_workers
    assert get_fresh(probes, "/healthz").json() == {"status": "live"}
    assert get_fresh(probes, "/readyz").json() == {"status": "ready", "workers": 2}
    victim = wait_until(lambda: worker_pid(url, 1), 60, "worker 1's pid")
    os.kill(victim, signal.SIGSTOP)
    try:
        stalled = wait_until(lambda: (r := get_fresh(probes, "/healthz")).status_code == 503
                             and r, 30, "the stopped worker seen stalled")
        assert "event loop stalled: worker slot 1 for" in stalled.json()["error"]["message"]
        assert get_fresh(probes, "/readyz").status_code == 503
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_until(lambda: get_fresh(probes, "/readyz").status_code == 200, 30, "ready again")
    assert get_fresh(probes, "/healthz").status_code == 200


@pytest.mark.slow  # several server processes
def test_killed_worker_is_restarted_while_the_other_serves(two_workers):
    proc, url, port, probes = two_workers
    for _ in range(20):
        assert post_fresh(port)[0] == 200
    total = requests_total(get_fresh(url, "/metrics").text)
    run = run_dirs(proc.pid)[0]

    def snapshot_total(slot: int) -> float:
        try:
            data = wire.loads((run / "snap" / f"w{slot}.snap").read_bytes())
        except FileNotFoundError:
            return -1
        registry = merge.registry_of(merge.merge_families([(slot, data["metrics"])]))
        return requests_total(generate_latest(registry).decode())

    # Quiet now: wait until both workers' periodic snapshots hold every request so far.
    wait_until(lambda: snapshot_total(0) + snapshot_total(1) >= total, 30, "snapshots")
    assert snapshot_total(1) > 0  # the worker about to die has answered some of them
    victim = {w["slot"]: w["pid"] for w in get_fresh(url, "/v1/stats").json()["workers"]}[1]

    with Load(port) as load:
        wait_until(lambda: len(load.ok) >= 10, 60, "load")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # Readiness from the surviving worker: false while slot 1 is away (both probes).
        def not_ready() -> bool:
            r = status_or_none(url, "/readyz")
            v2 = status_or_none(url, "/v2/health/ready")
            p = status_or_none(probes, "/readyz")  # the supervisor's probe port too
            return r is not None and r.status_code == 503 and "worker slot(s) [1]" in r.text \
                and v2 is not None and v2.status_code == 503 \
                and p is not None and p.status_code == 503 and "worker slot(s) [1]" in p.text

        wait_until(not_ready, 30, "not ready")

        def back() -> dict | None:
            answer = status_or_none(url, "/v1/stats")
            if answer is None:
                return None
            r = answer.json()
            pids = {w["slot"]: w["pid"] for w in r["workers"]}
            return r if r["ready"] and pids.get(1) not in (None, victim) else None

        wait_until(back, 120, lambda: f"worker 1 restarted ({len(load.ok)} ok, "
                                       f"{load.failed} failed)")
        back_at = time.monotonic()
        served_meanwhile = [t for t in load.ok if killed_at < t < back_at]
        wait_until(lambda: len(load.ok) > len([t for t in load.ok if t <= back_at]) + 5, 60,
                   lambda: f"service after the restart ({len(load.ok)} ok, {load.failed} "
                           f"failed, {load.wrong} wrong, "
                           f"{sum(t.is_alive() for t in load.threads)} threads)")
    assert len(served_meanwhile) > 0, "the other worker stopped serving"
    assert load.wrong == 0
    assert get_fresh(url, "/readyz").status_code == 200
    assert get_fresh(url, "/v2/health/ready").status_code == 200
    assert get_fresh(probes, "/readyz").json() == {"status": "ready", "workers": 2}
    # The dead worker's counts stay in the totals (its last snapshot was retired): without
    # that, the total would lose slot 1's share of the requests before the load.
    assert requests_total(get_fresh(url, "/metrics").text) >= total


@pytest.mark.slow  # several server processes
def test_sigterm_under_load_drains_every_worker_and_cleans_up():
    """Requests are held in the workers' queues (max_delay_us: a batch under
    max_batch_requests waits that long) when the supervisor gets SIGTERM; every accepted
    request gets its answer, the supervisor exits 0 and nothing of the instance is left in
    /dev/shm."""
    rng = np.random.default_rng(13)
    xs = [rng.standard_normal(1000 + 100 * i).astype("<f4") for i in range(24)]
    env = {"ACTSERVE_WORKERS": "2", "ACTSERVE_MAX_DELAY_US": "1000000",
           "ACTSERVE_MAX_BATCH_REQUESTS": "64"}
    with subprocess_server(env) as (proc, url):
        assert len(run_dirs(proc.pid)) == 1
        workers = [w["pid"] for w in get_fresh(url, "/v1/stats").json()["workers"]]

        async def run():
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
                tasks = post_silu_all(c, xs)
                deadline = asyncio.get_running_loop().time() + 30
                while (await c.get("/v1/stats")).json()["queue_depth"] < 8:
                    assert asyncio.get_running_loop().time() < deadline, "never queued"
                proc.send_signal(signal.SIGTERM)  # with at least 8 requests waiting
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        assert proc.wait(90) == 0
    assert exact_silu_answers(xs, results) >= 8
    assert all(pid_gone(p) for p in workers)
    assert run_dirs(proc.pid) == []


@pytest.mark.slow  # several server processes
def test_files_of_a_killed_server_are_removed_at_the_next_start():
    port = free_port()
    with subprocess_server({"ACTSERVE_WORKERS": "2"}, port=port) as (proc, url):
        workers = [w["pid"] for w in get_fresh(url, "/v1/stats").json()["workers"]]
        left = run_dirs(proc.pid)
        assert len(left) == 1 and (left[0] / "ready").exists()
        proc.kill()  # no clean-up by the supervisor; its workers drain and exit
        proc.wait(10)
        # left behind (checked at once: a supervisor that another test file starts in
        # parallel removes it too, as it should, once this one is gone)
        assert left[0].exists()
        wait_until(lambda: all(pid_gone(p) for p in workers), 60, "orphaned workers to exit")
    with subprocess_server({"ACTSERVE_WORKERS": "2"}) as (proc2, _):
        assert not left[0].exists()
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(60) == 0
