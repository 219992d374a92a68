"""A front end's limits follow the server (service/engine/front_limits.py,
scripts/nginx_limits.py; docs/deployment.md "Overload: let nginx refuse"): the rate the
queue drains each size class at under load x ``front_delay_ms``, kept in nginx by reloading
it. Fake clocks and the batcher's fake executors; nginx itself where it is installed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socketserver
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import nginx_limits
from service.engine import front_limits
from service.engine.front_limits import LARGE_ELEMENTS, MIN_LIMIT, WINDOW_S, FrontLimits
from service.observability.metrics import OverloadCollector
from tests.gates import FakeClock
from tests.test_batcher import run
from tests.test_overload import job, scheduler, settle, warm
from tests.test_overload import serve as serve_batches


def cycles(f: FrontLimits, clock: FakeClock, sizes: list[int], wall: float, count: int) -> None:
    for _ in range(count):
        clock.t += wall
        f.observe(sizes, wall, clock.t)


# -- the measure --------------------------------------------------------------------------------
def test_nothing_measured_means_no_limit():
    f = FrontLimits(0.05)
    snap = f.snapshot(1)
    assert snap["small"]["limit"] is None and snap["large"]["limit"] is None
    assert snap["delay_ms"] == 50 and snap["large_bytes"] == 100_000


def test_the_limit_is_the_rate_a_class_drains_at_times_the_delay():
    clock, f = FakeClock(), FrontLimits(0.05)
    # batches of 10 small requests, 5 ms each: 2,000 requests a second of cycle time
    cycles(f, clock, [1024] * 10, 0.005, int(WINDOW_S / 0.005) + 1)
    assert f.limit("small", 1) == 100  # 2,000/s x 50 ms
    assert f.limit("small", 2) == 200  # two executors drain twice as fast
    assert f.limit("large", 1) is None
    assert f.snapshot(1)["small"]["rate_per_s"] == pytest.approx(2000, rel=1e-6)


def test_a_batch_is_shared_between_the_classes_by_elements():
    clock, f = FakeClock(), FrontLimits(0.1)
    small, large = 1000, LARGE_ELEMENTS * 4  # 1 : 100 elements
    # 20 ms a cycle, 20 small and one large request: the large one's share is 100/120
    cycles(f, clock, [small] * 20 + [large], 0.02, int(WINDOW_S / 0.02) + 1)
    per_small = 0.02 * (20 * small / (20 * small + large)) / 20
    assert f.limit("small", 1) == pytest.approx(0.1 / per_small, abs=1)
    assert f.limit("large", 1) == round(0.1 / (0.02 * 100 / 120))  # 6
    assert front_limits.size_name(LARGE_ELEMENTS - 1) == "small"
    assert front_limits.size_name(LARGE_ELEMENTS) == "large"


def test_a_window_the_executor_was_not_kept_busy_measures_nothing():
    """Cycles with gaps between them (moderate load: the process worked on their requests
    in the gaps too) would read a rate above capacity: such a window is not counted."""
    clock, f = FakeClock(), FrontLimits(0.05)
    for _ in range(101):
        clock.t += 0.01 + 0.002  # a 10 ms cycle, then 2 ms idle: busy 83 % of the window
        f.observe([1024] * 20, 0.01, clock.t)
    assert f.limit("small", 1) is None
    for _ in range(101):
        clock.t += 0.01 + 0.0005  # busy 95 %
        f.observe([1024] * 20, 0.01, clock.t)
    assert f.limit("small", 1) == 100  # 2,000/s of cycle time x 50 ms
    for _ in range(101):  # two executors, each busy half the time: not saturated
        clock.t += 0.01
        f.observe([1024] * 10, 0.01, clock.t, executors=2)
    assert f.windows["small"] == 1


def test_a_window_with_too_few_requests_measures_nothing():
    clock, f = FakeClock(), FrontLimits(0.05)
    cycles(f, clock, [1024], 0.1, front_limits.WINDOW_MIN_REQUESTS - 1)
    assert f.limit("small", 1) is None


def test_the_best_rate_holds_against_a_slow_spell_and_decays_under_a_lasting_one():
    clock, f = FakeClock(), FrontLimits(0.05)
    cycles(f, clock, [1024] * 20, 0.01, 101)  # 2,000/s
    assert f.limit("small", 1) == 100
    cycles(f, clock, [1024] * 20, 0.04, 26)  # one window at 500/s: the best decays a little
    assert 90 <= f.limit("small", 1) < 100
    cycles(f, clock, [1024] * 20, 0.04, 26 * 60)  # a minute at 500/s: down to it
    assert f.limit("small", 1) == 25
    cycles(f, clock, [1024] * 20, 0.005, 201)  # faster (larger batches): up at once
    assert f.limit("small", 1) == 200


def test_the_limit_is_never_below_the_floor():
    clock, f = FakeClock(), FrontLimits(0.001)
    cycles(f, clock, [1024] * 20, 0.5, 3)  # 40/s x 1 ms
    assert f.limit("small", 1) == MIN_LIMIT


def test_several_workers_limits_add_up_and_an_unmeasured_one_counts_as_the_others():
    def part(small, large):
        return {"delay_ms": 50.0, "large_bytes": 100_000,
                "small": {"limit": small, "rate_per_s": None, "windows": 1},
                "large": {"limit": large, "rate_per_s": None, "windows": 0}}

    merged = front_limits.merged([part(100, None), part(60, None)])
    assert merged["small"] == {"limit": 160, "windows": 2, "workers_measured": 2}
    assert merged["large"]["limit"] is None
    assert front_limits.merged([part(100, 8), part(None, None), None])["small"]["limit"] == 200
    assert front_limits.merged([None, None]) is None


# -- measured where the queue is: cycles only, through the batcher ------------------------------
def test_the_batcher_measures_the_limit_from_cycles_while_work_waits():
    async def main():
        clock = FakeClock()
        # 1,000 elements at 10 us an element: 10 ms a request, one a batch -> 100/s
        async with scheduler(clock, per_element=1e-5, front_delay_ms=500) as (b, ex):
            await warm(b, ex, clock)  # alone: compute time, no cycle
            for _ in range(3):
                await warm(b, ex, clock)
            assert b.admission.snapshot()["front_limits"]["small"]["limit"] is None
            futs = [b.submit(job(clock, timeout=60)) for _ in range(130)]
            await serve_batches(ex, futs)  # a backlog: every batch's cycle is measured
            await settle()
            limits = b.admission.snapshot()["front_limits"]
            assert limits["small"]["limit"] == 50  # 100/s x 500 ms
            assert limits["small"]["windows"] == 1 and limits["large"]["limit"] is None

    run(main())


def test_with_an_engine_process_its_limits_reach_the_worker_that_shows_its_state():
    """``--engine process``: the queue (and so the measure) is the engine's; its snapshot
    travels in ``State`` and one worker shows it, so the workers' sum counts it once."""
    import msgspec

    from service.engine.admission import Admission
    from service.engine.ipc import messages
    from service.engine.ipc.remote import RemoteEngine
    from service.settings import Settings

    clock = FakeClock()
    a = Admission(Settings(), clock)
    cycles(a.front, clock, [1024] * 10, 0.005, 201)
    snapshot = a.snapshot()
    snapshot["prediction_error"]["buckets"] = list(snapshot["prediction_error"]["buckets"])
    state = messages.State(True, "", False, ["cpu"], [], 0, 5, snapshot)
    wire = messages.for_worker(memoryview(msgspec.msgpack.encode(state)))
    eng = RemoteEngine(Settings())
    eng._on_message(wire)
    shown = eng.overload()["front_limits"]
    assert shown["small"]["limit"] == 100 and shown["large"]["limit"] is None
    assert front_limits.merged([shown, None])["small"]["limit"] == 100  # counted once


def test_the_limits_are_exposed_to_prometheus_once_measured():
    def families(state):
        return {m.name: m for m in OverloadCollector(lambda: state).collect()}

    base = {"discipline": "fifo", "switches": 0, "backlog_s": 0.0,
            "prediction_error": {"buckets": [0.0], "counts": [0, 0], "sum": 0.0, "count": 0}}
    clock, f = FakeClock(), FrontLimits(0.05)
    assert families({**base, "front_limits": f.snapshot(1)})["actserve_front_limit"].samples == []
    cycles(f, clock, [1024] * 10, 0.005, 201)
    got = families({**base, "front_limits": f.snapshot(1)})["actserve_front_limit"].samples
    assert [(s.labels, s.value) for s in got] == [({"size_class": "small"}, 100.0)]


def test_v1_stats_carries_the_front_limits():
    import httpx

    from .conftest import serve

    with serve() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        limits = c.get("/v1/stats").json()["overload"]["front_limits"]
    assert limits["delay_ms"] == 50 and set(limits) >= {"small", "large"}
    assert limits["small"]["limit"] is None or limits["small"]["limit"] >= MIN_LIMIT


# -- the keeper: nginx's limits file and its reloads ---------------------------------------------
class Served:
    """What the keeper reads from /v1/stats, set by the test."""

    def __init__(self) -> None:
        self.front: dict | None = None

    def __call__(self, url: str) -> dict | None:
        return self.front


def limits(small: int | None, large: int | None) -> dict:
    return {"small": {"limit": small}, "large": {"limit": large}}


def test_the_keeper_reloads_only_for_a_real_move_and_not_too_often(tmp_path):
    clock, served, reloads = FakeClock(), Served(), []
    out = tmp_path / "limits.conf"
    k = nginx_limits.Keeper("http://x/v1/stats", out, lambda: reloads.append(out.read_text()),
                            {"small": 128, "large": 16}, change=0.25, min_interval_s=30,
                            clock=clock, get=served)
    k.start()
    assert "limit_conn actserve_small 128;" in out.read_text()
    assert nginx_limits.read(out) == {"small": 128, "large": 16}
    assert k.step() is None and reloads == []  # the server unreachable: nothing changes
    served.front = limits(None, None)
    assert k.step() is None  # nothing measured yet
    served.front = limits(150, None)
    assert k.step() is None  # within 25 %
    served.front = limits(300, None)
    assert k.step() == {"small": 300, "large": 16}
    assert reloads == [out.read_text()]
    assert "limit_conn actserve_small 300;" in reloads[0]
    assert "limit_conn actserve_large 16;" in reloads[0]  # not measured: kept
    served.front = limits(100, 40)
    clock.t += 29
    assert k.step() is None  # too soon after the last reload
    clock.t += 1
    assert k.step() == {"small": 100, "large": 40} and len(reloads) == 2
    again = nginx_limits.Keeper("http://x/v1/stats", out, lambda: None,
                                {"small": 128, "large": 16}, get=served)
    again.start()  # started again: what nginx has in force, not the initial numbers
    assert again.limits == {"small": 100, "large": 40} == nginx_limits.read(out)


def test_the_keeper_reads_the_front_limits_from_a_real_stats_answer():
    import httpx

    from .conftest import serve

    with serve() as srv:
        front = nginx_limits.fetch(srv.url + "/v1/stats")
        assert front is not None and front["delay_ms"] == 50
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/v1/stats").json()["overload"]["front_limits"] == front
    assert nginx_limits.fetch("http://127.0.0.1:9/v1/stats", timeout_s=1) is None


class Held(ThreadingHTTPServer):
    """An upstream that holds every POST until the test lets it go."""

    daemon_threads = True

    def __init__(self) -> None:
        self.arrived = threading.Semaphore(0)
        self.go = threading.Event()
        super().__init__(("127.0.0.1", 0), HeldHandler)

    def server_bind(self) -> None:  # no reverse lookup of the address (no resolver here)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


class HeldHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # nginx's readiness, as the bench's front end waits for it
        self._answer(b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.arrived.release()
        self.server.go.wait(30)
        self._answer(b'{"ok":true}')

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def post(url: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/activations/relu", data=b"x" * 64, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def workers_of(master: int) -> dict[int, str]:
    """nginx's worker processes and their titles ("nginx: worker process", "... is shutting
    down" once it has stopped accepting)."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == master:
                    found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def reloaded(master: int, old: set[int]) -> bool:
    """A new worker runs and the old ones no longer accept."""
    now = workers_of(master)
    return bool(set(now) - old) and all("shutting down" in now[p] for p in old if p in now)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                  else None)


# In CI (.ci/run installs Debian's nginx) a missing nginx fails the test instead.
@pytest.mark.socket
@pytest.mark.skipif(NGINX is None and os.environ.get("CI") != "true",
                    reason="nginx is not installed (.ci/run installs Debian's)")
def test_nginx_reloaded_by_the_keeper_passes_what_the_new_limit_allows(tmp_path):
    """A real nginx with a limit of one small request in flight refuses the second
    (``front_limit``); the keeper puts the server's limit of 2 in force (file, SIGHUP) and
    the same second request then passes, while the first is still held."""
    from loadtest import front_nginx

    upstream = Held()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    first: list = []
    try:
        nginx = front_nginx.start(tmp_path, f"127.0.0.1:{upstream.server_port}", 1, 1)[0]
        try:
            master = nginx.proc.pid
            before = set(workers_of(master))
            t = threading.Thread(target=lambda: first.append(post(nginx.url)), daemon=True)
            t.start()
            assert upstream.arrived.acquire(timeout=30)  # the first is held upstream
            status, body = post(nginx.url)
            assert status == 503 and body["error"]["type"] == "front_limit"
            served = Served()
            served.front = limits(2, 1)
            k = nginx_limits.Keeper(
                "http://x/v1/stats", tmp_path / "limits.conf",
                lambda: os.kill(nginx_limits.master_pid(tmp_path / "nginx.pid"), signal.SIGHUP),
                {"small": 1, "large": 1}, get=served)
            assert k.step() == {"small": 2, "large": 1}
            give_up = time.monotonic() + 30
            while not reloaded(master, before):  # the new limit in force (nginx's processes)
                assert time.monotonic() < give_up, f"nginx did not reload: {workers_of(master)}"
                threading.Event().wait(0.05)
            second: list = []
            t2 = threading.Thread(target=lambda: second.append(post(nginx.url)), daemon=True)
            t2.start()
            assert upstream.arrived.acquire(timeout=30)  # passed: the first still held
            upstream.go.set()
            t.join(30)
            t2.join(30)
            assert first == [(200, {"ok": True})] and second == [(200, {"ok": True})]
        finally:
            nginx.stop()
    finally:
        upstream.go.set()
        upstream.shutdown()
        upstream.server_close()
