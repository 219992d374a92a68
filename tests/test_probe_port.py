"""The probe port (``probe_port``, service/observability/probe_port.py): ``/healthz`` and
``/readyz`` answered by a thread that never waits for the event loop, a stalled loop
failing both, bad input answered and bounded; with several workers, the supervisor's
answer from the workers' flags and heartbeats (service/process/rundir.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from loadtest.servers import free_port
from service.observability import probe_port
from service.process.rundir import ReadyFlags
from tests.gates import FakeClock


class Engine:
    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.devices = ["cpu"]

    def not_ready_reason(self) -> str:
        return "warming up"


def test_answers_follow_the_engine_and_the_heartbeat():
    clock = FakeClock()
    beat = probe_port.Heartbeat(clock)
    engine = Engine()
    answer = probe_port.answers(engine, beat, stall_s=10.0)
    assert answer("/healthz") == (200, b'{"status":"live"}', None)
    status, body, retry = answer("/readyz")
    assert (status, json.loads(body), retry) == (200, {"status": "ready", "devices": ["cpu"]},
                                                 None)
    engine.ready = False  # warming up, restarting, draining: not ready, still live
    status, body, retry = answer("/readyz")
    assert (status, retry) == (503, 1)
    assert json.loads(body)["error"] == {"type": "not_ready", "message": "not ready: warming up"}
    assert answer("/healthz")[0] == 200
    engine.ready = True
    clock.t += 10.0  # exactly the limit: still live
    assert answer("/healthz")[0] == 200
    clock.t += 0.5  # past it: the loop is wedged; neither live nor ready
    for path in ("/healthz", "/readyz"):
        status, body, _ = answer(path)
        assert status == 503 and "event loop stalled: no tick for 10.5 s" in body.decode()
    beat.beat()  # it ran again
    assert answer("/healthz")[0] == answer("/readyz")[0] == 200
    # with several workers: ready only when every worker is (the others' flags)
    waiting = [1]
    several = probe_port.answers(engine, beat, stall_s=10.0, others=lambda: waiting)
    status, body, retry = several("/readyz")
    assert (status, retry) == (503, 1) and json.loads(body)["error"]["message"] == \
        "not ready: worker slot(s) [1] not ready"
    assert several("/healthz")[0] == 200
    waiting.clear()
    assert several("/readyz")[0] == 200
    # on the loop itself (the HTTP protocol's answers while congested): no heartbeat asked
    clock.t += 100
    assert probe_port.answers(engine)("/healthz")[0] == 200


def test_ready_flags_carry_each_workers_heartbeat(tmp_path):
    flags = ReadyFlags(tmp_path / "ready", 3, create=True)
    other = ReadyFlags(tmp_path / "ready", 3)  # a worker's view of the same file
    try:
        other.beat(0, 100.0)
        other.beat(2, 104.0)
        other.set(0, True)
        assert flags.stalled(105.0, 2.0) == {0: 5.0}  # slot 2 is not ready: not asked
        other.set(2, True)
        assert flags.stalled(107.0, 2.0) == {0: 7.0, 2: 3.0}
        other.beat(0, 106.5)
        other.beat(2, 106.5)
        assert flags.stalled(107.0, 2.0) == {}
        assert flags.not_ready() == [1]
    finally:
        other.close()
        flags.close()


def test_the_probe_port_answers_while_the_event_loop_is_held():
    from tests.conftest import serve

    probes = free_port()
    with serve(probe_port=probes, probe_stall_s=2.0) as srv:
        url = f"http://127.0.0.1:{probes}"
        assert httpx.get(url + "/healthz").json() == {"status": "live"}
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready",
                                                             "devices": srv.engine.devices}
        assert ready.json() == httpx.get(srv.url + "/readyz").json()  # as the API answers

        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the loop runs nothing else until released
            held.set()
            release.wait(60)

        srv.loop.call_soon_threadsafe(hold)
        assert held.wait(30)
        api_answer: list[httpx.Response] = []
        api = threading.Thread(target=lambda: api_answer.append(
            httpx.get(srv.url + "/readyz", timeout=60)))
        api.start()
        try:
            # answered while the API's own /readyz cannot be (the loop is held)
            assert httpx.get(url + "/readyz", timeout=10).status_code == 200
            assert api.is_alive() and not api_answer
            # held past probe_stall_s: wedged, not busy; both fail, naming why
            deadline = time.monotonic() + 30
            while (r := httpx.get(url + "/healthz", timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, "the held loop was never seen stalled"
                threading.Event().wait(0.1)
            assert r.status_code == 503 and "event loop stalled" in r.json()["error"]["message"]
            assert httpx.get(url + "/readyz", timeout=10).status_code == 503
        finally:
            release.set()
            api.join(60)
        assert api_answer[0].status_code == 200
        deadline = time.monotonic() + 30
        while httpx.get(url + "/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the loop ran again but stays 'stalled'"
            threading.Event().wait(0.1)


def test_the_probe_port_answers_bad_input_and_is_not_held_by_a_silent_client():
    from tests.conftest import serve

    probes = free_port()
    with serve(probe_port=probes) as srv:
        url = f"http://127.0.0.1:{probes}"
        r = httpx.get(url + "/v1/activate")  # only the probes here
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        post = httpx.post(url + "/readyz")
        assert post.status_code == 501 and post.json()["error"]["type"] == "not_implemented"
        head = httpx.head(url + "/readyz")
        assert head.status_code == 200 and head.content == b""
        with socket.create_connection(("127.0.0.1", probes), timeout=10) as s:
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            answer = s.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.0 400") and b'"invalid_request"' in answer
        with socket.create_connection(("127.0.0.1", probes), timeout=10) as silent:
            # sends nothing: dropped after READ_TIMEOUT_S; the next probe is answered
            assert httpx.get(url + "/readyz", timeout=10).status_code == 200
            assert silent.recv(100) == b""
        assert httpx.get(srv.url + "/readyz").status_code == 200  # the API never noticed


def test_the_probe_port_says_draining_and_closes_with_the_server():
    from tests.conftest import serve

    probes = free_port()
    with serve(probe_port=probes) as srv:
        url = f"http://127.0.0.1:{probes}"
        assert httpx.get(url + "/readyz").status_code == 200
        srv.engine.begin_drain()
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "not ready: draining"
        assert httpx.get(url + "/healthz").status_code == 200  # draining, still live
    try:
        httpx.get(url + "/healthz", timeout=5)
        raise AssertionError("the probe port outlived the server")
    except httpx.ConnectError:
        pass


def test_the_probe_port_listens_on_an_ipv6_host_without_a_name_lookup(monkeypatch):
    """An IPv6 host (``::1``) is bound as IPv6, and binding looks nothing up (the
    standard library's HTTPServer asks the resolver for the host's name at bind)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    looked_up = []
    monkeypatch.setattr(socket, "getfqdn", lambda *a: looked_up.append(a) or "")
    server = probe_port.ProbeServer("::1", 0, probe_port.answers(Engine()))
    server.start()
    try:
        r = httpx.get(f"http://[::1]:{server.port}/readyz", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ready"
    finally:
        server.stop()
    assert looked_up == []
