"""A front end's limits follow the server (service/observability/front_limits.py,
scripts/nginx_limits.py; docs/deployment.md "Overload: let nginx refuse"): the rate the
server answers each size class at while saturated x ``front_delay_ms``, kept in nginx by
reloading it. Fake clocks; a real server and a real nginx where they are needed."""

from __future__ import annotations

import json
import os
import signal
import socketserver
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtest import front_nginx
from scripts import nginx_limits
from service.observability import front_limits
from service.observability.front_limits import LARGE_BYTES, MIN_LIMIT, FrontLimits
from service.observability.recorder import Recorder
from tests.conftest import needs_nginx
from tests.gates import FakeClock

SMALL = 4096  # a body of 1,024 float32 elements


def answers(f: FrontLimits, clock: FakeClock, per_s: float, seconds: float,
            nbytes: int = SMALL, in_hand: int = 8, every: int = 0) -> None:
    """``per_s`` answers a second for ``seconds``, the server holding ``in_hand`` others
    as each ends (none at every ``every``-th, when ``every``)."""
    for i in range(round(per_s * seconds)):
        clock.t += 1 / per_s
        f.ended(nbytes, True, 0 if every and i % every == every - 1 else in_hand)


# -- the measure --------------------------------------------------------------------------------
def test_nothing_measured_means_no_limit():
    snap = FrontLimits(0.05).snapshot()
    assert snap["small"]["limit"] is None and snap["large"]["limit"] is None
    assert snap["delay_ms"] == 50 and snap["large_bytes"] == 100_000


def test_the_limit_is_the_rate_answered_while_saturated_times_the_delay():
    clock = FakeClock()
    f = FrontLimits(0.05, clock)
    answers(f, clock, 2000, 1.01)
    assert f.limit("small") == 100  # 2,000/s x 50 ms
    assert f.limit("large") is None
    assert f.snapshot()["small"]["rate_per_s"] == pytest.approx(2000, rel=0.01)


def test_a_window_with_slack_measures_nothing():
    """A server that once had no request in hand could have served more: what it answered
    is the load, not its capacity."""
    clock = FakeClock()
    f = FrontLimits(0.05, clock)
    answers(f, clock, 2000, 3.0, every=500)  # idle for an instant twice a window
    assert f.limit("small") is None
    answers(f, clock, 2000, 2.0)  # then saturated
    assert f.limit("small") == 100


def test_the_classes_follow_the_body_size_a_front_end_sees():
    clock = FakeClock()
    f = FrontLimits(0.1, clock)
    for _ in range(1010):  # 1,000 small and 100 large answers a second, together
        clock.t += 0.001
        f.ended(SMALL, True, 4)
        if clock.t * 1000 % 10 < 1:
            f.ended(LARGE_BYTES, True, 4)
    assert f.limit("small") == pytest.approx(100, abs=2)
    assert f.limit("large") == pytest.approx(10, abs=1)
    assert front_limits.size_name(LARGE_BYTES - 1) == "small"
    assert front_limits.size_name(LARGE_BYTES) == "large"


def test_refusals_and_failures_are_not_throughput_and_too_few_measure_nothing():
    clock = FakeClock()
    f = FrontLimits(0.05, clock)
    for _ in range(3000):
        clock.t += 0.0005
        f.ended(SMALL, False, 8)  # refused (503) or failed: not served
    assert f.limit("small") is None
    answers(f, clock, front_limits.WINDOW_MIN_REQUESTS - 1, 3.0)
    assert f.limit("small") is None


def test_the_best_rate_holds_against_a_slow_spell_and_decays_under_a_lasting_one():
    clock = FakeClock()
    f = FrontLimits(0.05, clock)
    answers(f, clock, 2000, 1.01)
    assert f.limit("small") == 100
    answers(f, clock, 500, 1.0)  # one window at 500/s: the best decays a little
    assert 90 <= f.limit("small") < 100
    answers(f, clock, 500, 60.0)  # a minute at 500/s: down to it
    assert f.limit("small") == 25
    answers(f, clock, 4000, 2.0)  # faster (larger batches): up at once
    assert f.limit("small") == 200


def test_the_limit_is_never_below_the_floor():
    clock = FakeClock()
    f = FrontLimits(0.001, clock)
    answers(f, clock, 40, 3.0)  # 40/s x 1 ms
    assert f.limit("small") == MIN_LIMIT


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


# -- measured where every request ends: the recorder --------------------------------------------
def test_the_recorder_measures_from_the_requests_it_records_and_exposes_the_limit():
    clock = FakeClock()
    r = Recorder(["gelu"], metrics=True, window_s=60, front_delay_s=0.05)
    r.front.clock = clock
    for _ in range(8):  # eight requests in hand throughout
        r.request_started()
    assert "\nactserve_front_limit{" not in r.metrics.exposition().decode()
    for _ in range(2020):  # each answered, the next one started: 2,000 a second
        clock.t += 0.0005
        r.request_started()
        r.record("native", "gelu", 200, total=0.004, bytes_in=SMALL)
    assert r.front.limit("small") == 100 and r.inflight == 8
    assert 'actserve_front_limit{size_class="small"} 100.0' in r.metrics.exposition().decode()
    for _ in range(8):  # the last ones end: no request in hand, slack from here
        r.record("native", "gelu", 503, total=0.001)
    assert r.front._slack and r.inflight == 0


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


@pytest.mark.socket
@needs_nginx
def test_nginx_reloaded_by_the_keeper_passes_what_the_new_limit_allows(tmp_path):
    """A real nginx with a limit of one small request in flight refuses the second
    (``front_limit``); the keeper puts the server's limit of 2 in force (file, SIGHUP) and
    the same second request then passes, while the first is still held."""
    assert front_nginx.NGINX is not None, "nginx is not installed (see .ci/run)"
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
