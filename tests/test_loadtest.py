"""Load-test building blocks: the seeded payloads and their bit-exact check against a real
server, and a bounded headless Locust run (Locust runs in a child process: importing it
here would monkey-patch the test process)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest

from loadtest import payloads, servers

from .conftest import ROOT, needs_nginx

CASES = [
    payloads.Case("relu", 1024),
    payloads.Case("gelu", 333, compute_dtype="bfloat16"),
    payloads.Case("leaky_relu", 100, params=(("negative_slope", 0.1),), inplace=True),
    payloads.Case("silu", 257, compute_dtype="float16"),
    payloads.Case("sigmoid", 64, amp=True),
]


@pytest.mark.parametrize("protocol", payloads.PROTOCOLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_payloads_match_the_server_bit_for_bit(client, protocol, case):
    case = payloads.Case(case.activation, case.size, protocol, case.params, case.compute_dtype,
                         case.amp, case.inplace)
    if protocol == "v2-json" and case.compute_dtype in ("float16", "bfloat16"):
        pytest.skip("16-bit outputs travel only as binary in v2")
    x = payloads.values(case, 5)
    req = payloads.build(case, x)
    r = client.post(req.path, content=req.body, headers=req.headers)
    assert r.status_code == 200, r.text
    got = payloads.parse(case, r.headers, r.content)
    want = payloads.expected(case, x)
    assert payloads.mismatch(case, got, want) is None
    assert got[1] == (case.compute_dtype or "float32")


def test_values_are_seeded_and_a_flipped_bit_is_a_mismatch():
    case = payloads.Case(size=4096)
    a, b = payloads.values(case, 1), payloads.values(case, 1)
    assert a.tobytes() == b.tobytes()
    assert payloads.values(case, 2).tobytes() != a.tobytes()
    want = payloads.expected(case, a)
    bad = want[0].copy()
    bad.view(np.uint32)[77] ^= 1
    msg = payloads.mismatch(case, (bad, "float32"), want)
    assert msg is not None and "1 of 4096" in msg and "index 77" in msg
    assert "dtype" in payloads.mismatch(case, (want[0], "float16"), want)


def test_mix_and_server_timing_parsing():
    assert payloads.weighted("a:3, b") == (["a", "b"], [3.0, 1.0])
    with pytest.raises(ValueError):
        payloads.weighted("a:0")
    t = payloads.server_timing("decode;dur=0.125, queue;dur=2.5, compute;dur=x, total;dur=3")
    assert t == {"decode": 0.125, "queue": 2.5, "total": 3.0}
    assert payloads.server_timing(None) == {}


def _locust(tmp_path, *args, timeout=150):
    argv = [sys.executable, "-m", "loadtest.run_locust", "--out", str(tmp_path), "--users", "4",
            "--spawn-rate", "4", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_headless_locust_run_starts_a_server_and_checks_every_answer(tmp_path):
    proc = _locust(tmp_path, "--run-time", "4s", "--progress-s", "1", "--",
                   "--act-protocols", "native-binary:2,native-json:1,v2-binary:1,v2-json:1",
                   "--act-sizes", "256:3,4096:1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path / "locust_final_stats.csv")
    posts = {r["Name"]: int(r["Request Count"]) for r in rows if r["Type"] == "POST"}
    sent = sum(posts.values())
    assert sent > 0
    assert {n.split()[0] for n in posts} >= {"native-binary"}
    assert all(int(r["Failure Count"]) == 0 for r in rows)
    # requests and Server-Timing phases are counted apart: the totals are the requests sent
    assert {r["Type"] for r in rows if r["Name"] != "Aggregated"} == {"POST"}
    aggregated = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(aggregated["Request Count"]) == sent
    timing = {r["Phase"]: int(r["Count"]) for r in _rows(tmp_path / "locust_final_server_timing.csv")}
    assert set(timing) == {"decode", "queue", "compute", "encode"}
    assert min(timing.values()) > 0 and max(timing.values()) <= sent
    report = (tmp_path / "report.html").read_text()
    assert re.search(rf'"name": "Aggregated", "num_failures": 0, "num_requests": {sent}\b', report)
    assert '<section id="server-timing">' in report.replace(' style="font-family:sans-serif;margin:2em"', "")
    assert f"{sent} requests (" in proc.stdout and "0 failures" in proc.stdout
    assert "Server-Timing phases" in proc.stdout
    progress = [ln for ln in proc.stdout.splitlines() if re.match(r"\[ *[0-9.]+s\] \d+ requests, ", ln)]
    assert progress, proc.stdout[-2000:]
    assert re.search(r"failures, [0-9.]+ req/s, p50 \d+ ms, p99 \d+ ms$", progress[-1])


@pytest.mark.slow
def test_locust_counts_answers_that_differ_as_failures(tmp_path):
    floor = servers.start_reference("floor", tmp_path / "logs")  # answers {"ok":true} to all
    with servers.running([floor]):
        proc = _locust(tmp_path, "--host", floor.url, "--run-time", "2s")
        assert httpx.get(floor.url + "/readyz").status_code == 200
    assert proc.returncode == 1, proc.stdout[-2000:]
    rows = [r for r in _rows(tmp_path / "locust_final_stats.csv") if r["Type"] == "POST"]
    total = sum(int(r["Request Count"]) for r in rows)
    assert total > 0 and sum(int(r["Failure Count"]) for r in rows) == total
    assert "unreadable answer" in (tmp_path / "locust_final_failures.csv").read_text()


@pytest.mark.slow
@pytest.mark.socket
def test_the_overload_bench_can_send_large_bodies_only_on_the_servers_100(tmp_path):
    """``--expect``: 1 MiB bodies go with ``Expect: 100-continue``, the head first and the
    body on the server's ``100 Continue``; every request is answered, the 200s counted."""
    from loadtest import overload

    assert overload.main(["--out", str(tmp_path), "--seconds", "0.5", "--sizes", "262144",
                          "--steps", "0.5", "--pool", "4", "--expect"]) == 0
    case = json.loads((tmp_path / "overload.json").read_text())["cases"][0]
    step = case["steps"][0]
    assert case["expect"] is True and case["capacity_per_s"] > 0
    assert step["ok"] + step["refused"] == step["sent"] and step["ok"] > 0
    assert "Expect: 100-continue" in (tmp_path / "overload.md").read_text()


def test_the_overload_generator_stamps_each_request_with_its_scheduled_time():
    """``--stamp``: ``X-Request-Start`` after the request line, the scheduled time on the
    wall clock in microseconds, the rest of the request unchanged."""
    from loadtest import overload
    from service.exchange import request_start

    raw = b"POST /v1/activations/relu?shape=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd"
    gen = overload.Generator("127.0.0.1", 1, raw, stamp=True)
    gen.wall_offset = 1_700_000_000.0  # wall time = scheduled perf_counter time + this
    wire = overload._Wire(gen)
    written: list[bytes] = []
    wire.transport = type("T", (), {"writelines": lambda self, parts: written.extend(parts),
                                    "write": lambda self, b: written.append(b)})()
    wire.send(12.5)
    sent = b"".join(written)
    line, _, rest = sent.partition(b"\r\n")
    stamp, _, rest = rest.partition(b"\r\n")
    assert line + b"\r\n" + rest == raw
    assert stamp.startswith(b"X-Request-Start: ")
    assert request_start.parse(stamp.partition(b": ")[2]) == 1_700_000_012.5
    plain = overload.Generator("127.0.0.1", 1, raw)
    wire = overload._Wire(plain)
    written.clear()
    wire.transport = type("T", (), {"write": lambda self, b: written.append(b)})()
    wire.send(12.5)
    assert written == [raw]


@pytest.mark.socket
def test_the_open_loop_waits_at_least_a_millisecond_between_sends(monkeypatch):
    """At thousands of requests a second the gaps between scheduled sends are shorter than
    the loop's timers: the generator sleeps a millisecond and sends what fell due together
    (each still timed from its own schedule) instead of spinning its core. Against a port
    nothing listens on, every request is accounted for (a connection error)."""
    import asyncio

    from loadtest import overload

    real_sleep = asyncio.sleep
    slept: list[float] = []

    async def recording_sleep(delay, *args):
        slept.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(overload.asyncio, "sleep", recording_sleep)
    with socket.socket() as held:  # bound, never listening: every connect is refused, and
        held.bind(("127.0.0.1", 0))  # no other test can take the port meanwhile
        gen = overload.Generator("127.0.0.1", held.getsockname()[1],
                                 b"GET / HTTP/1.1\r\n\r\n", max_conns=4, pool=0)
        out = asyncio.run(gen.open_loop(20_000, 0.05, deadline_s=0.1))
    assert len(out) == 1000 and {r[2] for r in out} == {-1}
    assert slept and min(slept) >= 0.001


@pytest.mark.slow
@pytest.mark.socket
def test_the_overload_bench_stamps_requests_for_a_server_that_trusts_them(tmp_path):
    from loadtest import overload

    assert overload.main(["--out", str(tmp_path), "--seconds", "0.5", "--sizes", "1024",
                          "--steps", "0.5", "--pool", "4", "--stamp"]) == 0
    result = json.loads((tmp_path / "overload.json").read_text())
    assert result["meta"]["settings"]["trust_request_start"] is True
    case = result["cases"][0]
    step = case["steps"][0]
    assert case["stamp"] is True and step["ok"] > 0  # stamps in step with the server's clock
    assert step["ok"] + step["refused"] == step["sent"]
    assert "X-Request-Start trusted" in (tmp_path / "overload.md").read_text()


def test_the_locust_overload_shape_holds_capacity_times_each_step():
    from loadtest.overload_shape import users_at

    steps = [0.5, 1.0, 2.0, 5.0, 10.0]
    got = [users_at(t, 300.0, steps, 10.0) for t in (0.0, 9.9, 10.0, 25.0, 49.9, 50.0)]
    assert got == [150, 150, 300, 600, 3000, None]
    assert users_at(0.0, 0.5, [0.5], 1.0) == 1  # one user at least


@pytest.mark.slow
def test_the_locust_overload_shape_runs_its_steps_and_stops(tmp_path):
    """Headless against a real server: users at 0.5x and 1x of a small capacity, each
    sending a request a second with a 1 s deadline; the run stops by itself after the
    last step, every answer a 200 in time (the server trusts the users' X-Request-Start:
    a stamp off the server's clock would have been refused 504)."""
    child = servers.start_actserve("actserve-locust-overload", tmp_path / "logs",
                                   {"trust_request_start": True})
    with servers.running([child]):
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locust_overload.py", "--headless",
             "--host", child.url, "--overload-capacity", "8", "--overload-steps", "0.5,1",
             "--overload-step-s", "2", "--csv", str(tmp_path / "ov"), "--only-summary"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [r for r in _rows(tmp_path / "ov_stats.csv") if r["Type"] == "POST"]
    assert [r["Name"] for r in rows] == ["gelu 1024"]
    assert int(rows[0]["Request Count"]) > 0 and int(rows[0]["Failure Count"]) == 0


def test_the_locust_overload_user_names_refusals_by_their_error_type():
    from loadtest.overload_shape import refusal

    assert refusal(503, b'{"error":{"type":"front_limit","message":"x"}}') == "503 front_limit"
    assert refusal(429, b'{"error":{"type":"client_share"}}') == "429 client_share"
    assert refusal(502, b"<html>bad gateway</html>") == "502"


def test_the_progress_line_rate_is_measured_over_its_interval():
    from types import SimpleNamespace

    from loadtest.progress import progress_line

    total = SimpleNamespace(num_requests=1209, num_failures=0, current_rps=0.0,
                            get_response_time_percentile=lambda q: 3.0)
    assert "241.8 req/s" in progress_line(total, 5.0)  # the first line: 1209 in 5 s
    assert "100.0 req/s" in progress_line(total, 10.0, (709, 5.0))


@pytest.mark.slow
@pytest.mark.socket
def test_the_overload_bench_sends_on_schedule_and_reports_every_request(tmp_path):
    """``loadtest.overload`` end to end on a short run: a real actserve child, the
    open-loop generator, one step; every scheduled request is accounted for and the 200s
    are counted as goodput."""
    from loadtest import overload

    assert overload.main(["--out", str(tmp_path), "--seconds", "0.5", "--sizes", "1024",
                          "--steps", "0.5", "--pool", "8", "--max-conns", "64"]) == 0
    result = json.loads((tmp_path / "overload.json").read_text())
    case = result["cases"][0]
    step = case["steps"][0]
    assert case["capacity_per_s"] > 0 and result["meta"]["pool"] == 8
    assert result["meta"]["max_conns"] == 64
    assert step["sent"] == int(step["offered_per_s"] * 0.5)  # sent on schedule, all answered
    assert step["ok"] + step["refused"] == step["sent"]
    assert step["goodput_per_s"] > 0 and step["ok_p99_ms"] is not None
    # /readyz asked on the API port and on the probe port (each answered 200, or it raises)
    assert step["readyz_max_ms"] is not None and step["probe_port_readyz_max_ms"] is not None
    assert 0 <= step["client_cpu_pct"] <= 100 * len(os.sched_getaffinity(0))  # the generator's
    # the server's CPU, measured from /proc: it served, so it used some
    assert case["served_cpu_us"] > 0 and step["server_cpu_pct"] > 0
    assert step["refusing_cpu_share"] is not None
    # the server's own count of its overload refusals, by stage, never more than answered
    assert sum(step["refused_by_stage"].values()) <= step["refused"]
    assert 0 < step["reached_per_s"] <= step["sent"] / 0.5
    assert 0 <= step["late_200_new_connection"] <= step["late_200"]
    assert (tmp_path / "overload.md").read_text().count("| 0.5x |") == 1


def test_the_overload_bench_reads_the_servers_refusals_by_stage():
    from loadtest.overload import stage_counts

    text = ('# TYPE actserve_overload_refusals_total counter\n'
            'actserve_overload_refusals_total{stage="unparsed"} 120.0\n'
            'actserve_overload_refusals_total{stage="queued"} 3.0\n'
            'actserve_rejections_total{reason="queue_full"} 7.0\n')
    assert stage_counts(text) == {"unparsed": 120, "queued": 3}


def test_the_overload_bench_counts_what_reached_the_server_apart_from_what_was_offered():
    """Requests the generator had no connection for never reached the server: the step
    says how much load the server really saw."""
    from loadtest.overload import summarize

    results = ([(0.0, 0.01, 200, "")] * 6 + [(0.0, 0.002, 503, "predicted_late")] * 2
               + [(0.0, 0.0, -1, "client_no_connection")] * 4)
    row = summarize(results, 2.0, 1.0, 6.0)
    assert row["sent"] == 12 and row["reached_per_s"] == 4.0  # (12 - 4) / 2 s
    assert row["goodput_per_s"] == 3.0 and row["refused"] == 6


def test_the_overload_bench_splits_the_servers_cpu_between_serving_and_refusing():
    """``cpu_split``: what is left of a step's CPU after its served requests (at the cost
    measured at capacity) is the refusals', per refusal the server made; the generator's own
    failures (no connection, timeouts) cost the server nothing and are not counted."""
    from loadtest.overload import cpu_split

    # 2 s of CPU over 2 s: 4,000 served at 200 µs = 0.8 s; 1.2 s over 40,000 refusals
    out = cpu_split(2.0, 2.0, 4000, {"predicted_late": 30000, "queue_full": 10000,
                                     "client_no_connection": 9999, "client_timeout": 5}, 200e-6)
    assert out == {"server_cpu_pct": 100, "refusal_cpu_us": 30.0, "refusing_cpu_share": 0.6}
    # nothing refused: no per-refusal figure, no share
    assert cpu_split(1.0, 2.0, 1000, {"client_timeout": 3}, 200e-6) == {
        "server_cpu_pct": 50, "refusal_cpu_us": None, "refusing_cpu_share": 0.0}
    # served requests costing more than measured leave nothing for refusals, never below 0
    assert cpu_split(1.0, 1.0, 10000, {"queue_full": 10}, 200e-6)["refusal_cpu_us"] == 0.0
    # no capacity figure: only the cores in use
    assert cpu_split(1.5, 1.0, 10, {"queue_full": 10}, None) == {
        "server_cpu_pct": 150, "refusal_cpu_us": None, "refusing_cpu_share": None}


@pytest.mark.slow
@pytest.mark.socket
@needs_nginx
def test_the_overload_bench_through_nginx_refuses_past_its_limit_in_the_apis_format(tmp_path):
    """``--front nginx``: the load goes through a real nginx that passes at most 2 requests
    at once; at 2x of the capacity measured through it, every scheduled request is
    answered, and those nginx refused carry the API's error type (``front_limit``)."""
    from loadtest import front_nginx, overload

    assert front_nginx.NGINX is not None, "nginx is not installed (see .ci/run)"
    assert overload.main(["--out", str(tmp_path), "--seconds", "0.5", "--sizes", "1024",
                          "--steps", "2", "--pool", "16", "--front", "nginx",
                          "--front-conns", "2"]) == 0
    result = json.loads((tmp_path / "overload.json").read_text())
    step = result["cases"][0]["steps"][0]
    assert result["meta"]["front"] == "nginx" and result["meta"]["front_conns"] == 2
    assert step["ok"] + step["refused"] == step["sent"] and step["ok"] > 0
    assert step["reasons"].get("front_limit", 0) > 0, step["reasons"]
    assert "through nginx (at most 2 small and 16 large requests in flight)" in \
        (tmp_path / "overload.md").read_text()


@pytest.mark.slow
@pytest.mark.socket
@needs_nginx
def test_the_overload_bench_runs_the_limits_keeper_beside_nginx(tmp_path):
    """``--front nginx --front-follow``: ``scripts/nginx_limits.py`` runs beside nginx,
    every request is answered, each step records the limits nginx has in force (what the
    server measured, or the bench's until then)."""
    from loadtest import overload

    assert overload.main(["--out", str(tmp_path), "--seconds", "0.5", "--sizes", "1024",
                          "--steps", "1", "--pool", "16", "--front", "nginx",
                          "--front-follow", "--front-cpus", "0"]) == 0
    result = json.loads((tmp_path / "overload.json").read_text())
    step = result["cases"][0]["steps"][0]
    assert result["meta"]["front_follow"] is True and result["meta"]["front_cpus"] == "0"
    assert step["ok"] + step["refused"] == step["sent"] and step["ok"] > 0
    limits = step["front_limits"]
    assert set(limits) == {"small", "large"} and limits["large"] >= 4 and limits["small"] >= 4
    assert set(step["server_front_limits"]) <= {"small", "large"}  # those measured so far
    reloads = result["meta"]["front_reloads"]  # the keeper's log, each reload it made
    assert all("nginx reloaded: small " in line for line in reloads), reloads
    assert "limits kept at the server's measured rate" in (tmp_path / "overload.md").read_text()


def test_refusal_cost_answers_every_case_as_it_should():
    """``loadtest.refusal_cost`` raises when a case's answers are not all 200 (served) or
    all 503 (the refusals): one short round of each, in process."""
    from loadtest import refusal_cost

    assert refusal_cost.main(["--elements", "1024", "--rounds", "1", "--per-conn", "1"]) == 0


@pytest.mark.slow
@pytest.mark.socket
@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"),
                    reason="wrk is not installed (.ci/run installs it)")
def test_refusal_cost_with_real_sockets_checks_every_answer_and_leaves_affinity_alone():
    """``loadtest.refusal_sockets``: wrk against the production server class in this
    process; each case's answers are checked (it raises otherwise), an unparsed refusal
    costs less CPU than a served request, and this process's cores are given back."""
    from loadtest import refusal_sockets

    before = os.sched_getaffinity(0)
    got = refusal_sockets.measure(rounds=1, seconds=1)
    assert os.sched_getaffinity(0) == before
    assert set(got) == set(refusal_sockets.CASES) and all(g["per_s"] > 0 for g in got.values())
    cost = {case: g["user_us"] + g["sys_us"] for case, g in got.items()}
    assert 0 < cost["refused unparsed"] < cost["served"]


@pytest.mark.slow
@pytest.mark.socket
def test_ab_latency_compares_two_servers_at_a_fixed_open_loop_rate(capsys):
    """``scripts.ab_latency`` end to end: two real servers (the same checkout twice), one
    short round a side at a low rate, every answer a 200 (else it exits), and the table of
    medians and ratios printed."""
    from scripts import ab_latency

    assert ab_latency.main(["--before", ".", "--after", ".", "--rate", "200", "--seconds",
                            "0.5", "--rounds", "2", "--pool", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 200 p")]
    assert [r.split("|")[1].strip() for r in rows] == ["200 p50", "200 p99"]
    for row in rows:
        before, after = (float(c) for c in row.split("|")[2:4])
        assert before > 0 and after > 0


def _timer(*args: str) -> dict:
    """``loadtest.probe_timer`` run to its end (standard input closed at once: one probe
    a port)."""
    proc = subprocess.run([sys.executable, "-m", "loadtest.probe_timer", *args], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.socket
def test_the_probe_timer_times_readyz_on_both_ports_from_its_own_process():
    from tests.conftest import free_port, serve

    probes = free_port()
    with serve(probe_port=probes) as srv:
        found = _timer("--api-port", str(srv.port), "--probe-port", str(probes))
    assert found["error"] is None
    assert len(found["api"]) >= 1 and len(found["probe"]) >= 1
    assert all(0 < t < 60 for t in found["api"] + found["probe"])


@pytest.mark.socket
def test_the_probe_timer_reports_a_probe_answered_other_than_200():
    import socketserver
    import threading

    class Unready(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            self.wfile.write(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Unready) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            found = _timer("--probe-port", str(server.server_address[1]))
        finally:
            server.shutdown()
    assert found["error"] == "HTTP/1.0 503 Service Unavailable" and found["probe"] == []
