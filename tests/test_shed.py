"""Overload refusals in the HTTP protocol, before the application (service/http/shed.py),
the deadline counted from a request's arrival (jobs.ARRIVED), and the service model's
cost taken from the executor's whole cycle while work waits (admission.py)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from service.engine.admission import Admission, PredictedLate
from service.engine.jobs import ARRIVED
from service.http.shed import ARRIVAL_KEY, Shed
from service.observability import probe_port
from service.observability.recorder import Recorder
from service.settings import Settings
from tests.gates import FakeClock


class Registry:
    def find(self, name: str):
        return type("A", (), {"name": name})() if name in ("gelu", "relu") else None


class FakeEngine:
    """The two calls the shed makes: ``busy`` and ``admit`` (which raises what the engine
    would refuse)."""

    def __init__(self, busy: bool = True, refuse: bool = False) -> None:
        self.registry = Registry()
        self._busy = busy
        self.refuse = refuse
        self.hints: list = []

    def busy(self) -> bool:
        return self._busy

    def admit(self, hint=None) -> None:
        self.hints.append(hint)
        if self.refuse:
            raise PredictedLate("late")


class FakeServices:
    def __init__(self, engine, **settings) -> None:
        self.settings = Settings(**settings)
        self.engine = engine
        self.recorder = Recorder(["gelu", "relu"], metrics=True, window_s=60)


def _shed(engine, clock=None, **settings) -> Shed:
    return Shed(FakeServices(engine, **settings), clock=clock or FakeClock())


HOST = [(b"host", b"127.0.0.1")]
SMALL = [*HOST, (b"content-type", b"application/octet-stream"), (b"content-length", b"4096")]


def _rejections(text: str, reason: str) -> float:
    """``actserve_rejections_total`` for ``reason`` in a Prometheus exposition."""
    prefix = f'actserve_rejections_total{{reason="{reason}"}}'
    return float(next(ln for ln in text.splitlines() if ln.startswith(prefix)).split()[-1])


def _stage(text: str, stage: str) -> float:
    """``actserve_overload_refusals_total`` for ``stage`` in a Prometheus exposition."""
    prefix = f'actserve_overload_refusals_total{{stage="{stage}"}}'
    return float(next(ln for ln in text.splitlines() if ln.startswith(prefix)).split()[-1])


def test_not_busy_nothing_is_refused_and_admit_is_not_asked():
    engine = FakeEngine(busy=False, refuse=True)
    shed = _shed(engine)
    assert shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, "c", 1000.0, 10_000) is None
    assert engine.hints == []


def test_busy_a_request_admit_refuses_is_refused_here_with_its_hint_and_counted():
    engine = FakeEngine(refuse=True)
    shed = _shed(engine)
    got = shed.refusal(b"POST", b"/v1/activations/gelu?timeout=0.5&priority=0", SMALL,
                       "10.0.0.1", 1000.0, 0)
    assert got is not None
    api, activation, exc = got
    assert (api, activation, exc.type, exc.status) == ("native", "gelu", "predicted_late", 503)
    hint = engine.hints[0]
    assert hint.elements == 1024 and hint.timed  # float32 from the declared length
    assert hint.deadline == pytest.approx(1000.5)  # counted from the arrival
    assert shed.refused == 1
    exposition = shed.recorder.metrics.exposition().decode()
    assert _rejections(exposition, "predicted_late") == 1
    assert _stage(exposition, "headers") == 1  # made after parsing the headers
    v2 = shed.refusal(b"POST", b"/v2/models/relu/versions/1/infer", SMALL, None, 1000.0, 0)
    assert v2 is not None and v2[:2] == ("v2", "relu")


def test_what_the_application_answers_otherwise_is_left_to_it():
    engine = FakeEngine(refuse=True)
    shed = _shed(engine, api_keys="k-0123456789abcdef")
    for method, url, headers in [
        (b"GET", b"/v1/activations/gelu", SMALL),
        (b"POST", b"/v1/activations/nope", SMALL),  # unknown: its 404
        (b"POST", b"/v1/custom", SMALL),  # another route
        (b"POST", b"/v1/activations/gelu", SMALL),  # no API key: its 401
        (b"POST", b"/v1/activations/gelu", [*SMALL, (b"authorization", b"Bearer wrong")]),
    ]:
        assert shed.refusal(method, url, headers, None, 1000.0, 0) is None
    ok = [*SMALL, (b"authorization", b"Bearer k-0123456789abcdef")]
    assert shed.refusal(b"POST", b"/v1/activations/gelu", ok, None, 1000.0, 0) is not None
    hosts = _shed(FakeEngine(refuse=True), allowed_hosts="api.example")
    assert hosts.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, 1000.0, 0) is None


def test_congested_a_request_is_refused_when_what_is_held_leaves_it_no_time():
    clock = FakeClock()
    engine = FakeEngine(busy=False, refuse=False)
    shed = _shed(engine, clock, overload_interval_ms=200, overload_target_delay_ms=50,
                 overload_safety=1.0, default_timeout_s=30)
    for _ in range(200):  # 200 answers in one interval (0.2 s), each waited 80 ms
        shed.observe(0.08)
        clock.t += 0.001
    clock.t += 0.001
    shed.observe(0.08)  # the interval rolls: about 1,000 a second, standing delay 80 ms
    assert shed.rate == pytest.approx(1000, rel=0.01) and shed.congested
    assert shed.standing == pytest.approx(0.08)
    # Little's law against a tenth of the request's own timeout (2 s): about 1,000 x 0.2 s
    limit = shed.limit(2.0)
    assert limit == int(shed.rate * 2.0 * 0.1)
    url = b"/v1/activations/gelu?timeout=2"
    assert shed.refusal(b"POST", url, SMALL, None, clock.t, limit - 1) is None
    got = shed.refusal(b"POST", url, SMALL, None, clock.t, limit)
    assert got is not None and got[2].type == "predicted_late" and got[2].retry_after == 1
    assert len(engine.hints) == 1  # the limit refused before admit was asked
    # the default timeout (30 s) leaves room for a burst of long-deadline requests (3 s)
    assert shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, clock.t, limit) is None
    assert shed.shedding(shed.cap) and not shed.shedding(shed.cap - 1)
    assert shed.budget(b"shape=4&timeout=2") == 2.0 and shed.budget(b"xtimeout=2") == 30
    # the remembered rate decays when fewer are answered, never at once
    for _ in range(3):
        clock.t += 0.2
        shed.observe(0.08)
    assert 0.9 * 1000 < shed.rate < 1000 and shed.cap >= 8


def test_not_congested_the_limit_never_refuses_and_a_busy_engine_decides():
    """At or below capacity some request is answered quickly in every interval: the
    standing delay stays under the target and nothing is refused by the limit, however
    many requests are held; a busy engine's own check still runs."""
    clock = FakeClock()
    engine = FakeEngine(busy=False, refuse=True)
    shed = _shed(engine, clock, overload_interval_ms=100, overload_target_delay_ms=50)
    shed.congested = True  # it was; one quick answer in an interval ends it
    for delay in (0.3, 0.01, 0.2):
        shed.observe(delay)
        clock.t += 0.04
    shed.observe(0.5)  # the interval rolls
    assert shed.standing == pytest.approx(0.01) and not shed.congested
    shed.cap = 8
    assert not shed.shedding(10**6)
    assert shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, clock.t, 10**6) is None
    engine._busy = True  # the engine's predicted wait is over the target: its check
    got = shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, clock.t, 10**6)
    assert got is not None and got[2].type == "predicted_late"
    assert engine.hints[-1].deadline == pytest.approx(clock.t + 30.0)  # from the arrival


def test_the_state_switches_with_hysteresis_and_a_silent_interval_counts_as_slow():
    clock = FakeClock()
    shed = _shed(FakeEngine(busy=False), clock, overload_interval_ms=100,
                 overload_target_delay_ms=50)

    def interval(*delays: float) -> None:
        for d in delays:
            shed.observe(d)
        clock.t += 0.1
        shed.observe(delays[-1] if delays else 10.0)  # rolls

    interval(0.06, 0.07)
    assert shed.congested  # the least over the target
    interval(0.04, 0.03)
    assert shed.congested  # under the target, not under half of it: unchanged
    interval(0.02)
    assert not shed.congested  # under half
    interval(0.04)
    assert not shed.congested  # between the two: unchanged
    clock.t += 1.0  # a second with nothing answered, then one answer 1.2 s old
    shed.observe(1.2)
    assert shed.congested and shed.rate > 0
    # idle for two intervals, nothing held: a new request finds the server not congested
    # (a burst after a quiet spell is served, not refused by a state from before it)
    clock.t += 0.3
    shed.limit = lambda budget: 0  # whatever is held leaves no time
    assert shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, clock.t, 1) is not None
    assert shed.refusal(b"POST", b"/v1/activations/gelu", SMALL, None, clock.t, 0) is None
    assert not shed.congested and not shed.shedding(10)


def test_a_jobs_deadline_counts_from_the_requests_arrival(app):
    jobs = app.services.engine.jobs
    act = app.services.engine.registry.get("relu")
    import numpy as np

    token = ARRIVED.set(time.monotonic() - 0.4)
    try:
        job = jobs.build(act, np.zeros(4, "float32"), "float32", {"timeout": 1.0}, {},
                         api="native")
    finally:
        ARRIVED.reset(token)
    assert job.deadline - time.monotonic() == pytest.approx(0.6, abs=0.05)


def test_the_model_costs_a_batch_its_whole_cycle_while_work_waits():
    clock = FakeClock()
    a = Admission(Settings(), clock)
    ex = object()
    a.started(ex, 0.0)
    clock.t += 0.001
    a.finished(ex, "gelu", "cpu", [1000], wall=0.001, waiting=True)
    assert a.model.predict("gelu", 1000) == 0.0  # not yet: its cycle is not over
    clock.t += 0.009  # the loop answers, decodes ... then dispatches the next batch
    a.started(ex, 0.0)
    assert a.model.predict("gelu", 1000) == pytest.approx(0.010)
    clock.t += 0.001
    b = Admission(Settings(), clock)
    b.started(ex, 0.0)
    clock.t += 0.001
    b.finished(ex, "gelu", "cpu", [1000], wall=0.001, waiting=False)  # nothing waits
    assert b.model.predict("gelu", 1000) == pytest.approx(0.001)
    b.started(ex, 0.0)
    b.lost(ex)
    assert ex.__class__ is object and id(ex) not in b.running


# -- on a real socket -----------------------------------------------------------------------
class Refusing:
    """The server's engine, but busy and refusing every hint (``refuse``), or neither."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.on = True

    def busy(self) -> bool:
        return self.on

    def admit(self, hint=None) -> None:
        if self.on:
            raise PredictedLate("the server would finish this request late")


def _read_answer(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        rest += s.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:length]


def _post(n: int, body: bool = True) -> bytes:
    x = bytes(4 * n)
    head = (f"POST /v1/activations/relu?shape={n}&dtype=float32&timeout=5 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"X-Request-Id: shed-1\r\nContent-Length: {len(x)}\r\n\r\n").encode()
    return head + x if body else head


KEY = "k-0123456789abcdef"


def _keyed(raw: bytes) -> bytes:
    return raw.replace(b"Host: ", f"Authorization: Bearer {KEY}\r\nHost: ".encode(), 1)


def test_before_the_application_a_refusal_is_answered_by_the_protocol():
    """After its headers are parsed (with API keys configured the raw-bytes path is off,
    so every refusal here is the parsed one)."""
    from tests.conftest import serve

    with serve(metrics=True, api_keys=KEY) as srv:
        shed = srv.services.shed
        fake = Refusing(shed.engine)
        shed.engine = fake
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            # a whole small request: refused, the connection kept
            s.sendall(_keyed(_post(256)))
            status, headers, body = _read_answer(s)
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["x-request-id"] == "shed-1"
            assert "close" not in headers.get("connection", "")
            assert json.loads(body)["error"]["type"] == "predicted_late"
            fake.on = False  # the same connection, served again once the engine is not busy
            s.sendall(_keyed(_post(256)))
            status, headers, body = _read_answer(s)
            assert status == 200 and len(body) == 4 * 256
        fake.on = True
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            # headers only, a MiB declared and never sent: answered at once (no body read),
            # and the connection closed after the answer
            s.sendall(_keyed(_post(1 << 18, body=False)))
            status, headers, _ = _read_answer(s)
            assert status == 503 and headers["connection"] == "close"
        import httpx

        metrics = httpx.get(srv.url + "/metrics").text
        assert _rejections(metrics, "predicted_late") == 2
        assert _stage(metrics, "headers") == 2 and _stage(metrics, "unparsed_admission") == 0


class _Admits(Refusing):
    """Busy always, and ``admit`` raises ``exc`` (the engine's own refusal) while ``on``."""

    def __init__(self, engine, exc) -> None:
        super().__init__(engine)
        self.exc = exc

    def busy(self) -> bool:
        return True

    def admit(self, hint=None) -> None:
        if self.on:
            raise self.exc


def test_while_the_engine_is_busy_its_refusals_are_made_from_the_raw_bytes():
    """Not congested, the engine busy: a request is refused from its raw bytes with what
    the engine's admission says (any of its refusals), never parsed; its id kept, its
    connection kept, the refusal counted at once; served again once the engine admits.
    The server's own congestion never comes into it (it is measured from answers the
    application makes, which a flood refused in the protocol would starve)."""
    import httpx

    from service.errors import QueueFull
    from tests.conftest import serve

    with serve(metrics=True) as srv:
        shed = srv.services.shed
        fake = shed.engine = _Admits(shed.engine, QueueFull("the queue is full (9 waiting)"))
        parsed = []
        real_refusal = shed.refusal

        def spied(*args):
            if args[0] == b"POST":
                parsed.append(args)
            return real_refusal(*args)

        shed.refusal = spied
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_post(256))
            status, headers, body = _read_answer(s)
            assert (status, json.loads(body)["error"]["type"]) == (503, "queue_full")
            assert headers["x-request-id"] == "shed-1" and "retry-after" in headers
            assert "close" not in headers.get("connection", "")
            # headers only, a MiB declared: answered before its body, the connection kept;
            # the body is then dropped as it arrives and the next request read
            s.sendall(_post(1 << 18, body=False))
            status, headers, _ = _read_answer(s)
            assert status == 503 and "close" not in headers.get("connection", "")
            fake.exc = PredictedLate("the server would finish this request late")
            s.sendall(_post(1 << 18)[len(_post(1 << 18, body=False)):] + _post(64))
            status, _, body = _read_answer(s)
            assert (status, json.loads(body)["error"]["type"]) == (503, "predicted_late")
            assert parsed == [] and not shed.congested
            metrics = httpx.get(srv.url + "/metrics").text
            assert _rejections(metrics, "queue_full") == 2
            assert _rejections(metrics, "predicted_late") == 1
            assert _stage(metrics, "unparsed_admission") == 3  # where they were made
            assert _stage(metrics, "headers") == 0 and _stage(metrics, "unparsed") == 0
            fake.on = False  # admitted from the raw bytes: parsed and served on the same
            s.sendall(_post(256))  # connection, the parsed path not asked the same again
            status, _, body = _read_answer(s)
            assert status == 200 and len(body) == 4 * 256 and parsed == []


def test_a_stale_stamp_is_refused_from_the_raw_bytes_while_the_engine_is_busy():
    """``trust_request_start``: a request whose stamp puts it past its deadline is 504
    ``deadline_exceeded`` from its raw bytes, its wait counted once; a fresh one goes on
    to the engine's admission."""
    import re

    import httpx

    from tests.conftest import serve

    with serve(metrics=True, trust_request_start=True) as srv:
        shed = srv.services.shed
        fake = shed.engine = _Admits(shed.engine, PredictedLate("late"))
        fake.on = False  # busy, but admitting: only the stamp can refuse
        parsed = []
        real_refusal = shed.refusal
        shed.refusal = lambda *args: parsed.append(args[1]) or real_refusal(*args)
        stale = _post(4).replace(b"Host: ", b"X-Request-Start: t=%.6f\r\nHost: "
                                 % (time.time() - 30), 1)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(stale)
            status, _, body = _read_answer(s)
            assert (status, json.loads(body)["error"]["type"]) == (504, "deadline_exceeded")
            assert parsed == []  # from the raw bytes
            s.sendall(_post(4))
            assert _read_answer(s)[0] == 200
        text = httpx.get(srv.url + "/metrics").text
        count = re.search(r"^actserve_request_start_wait_seconds_count (\S+)$", text, re.M)
        assert count and float(count.group(1)) == 1
    with serve(metrics=False, trust_request_start=True) as srv:  # no histogram to count in
        shed = srv.services.shed
        shed.engine = _Admits(shed.engine, PredictedLate("late"))
        shed.engine.on = False
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(stale)
            status, _, body = _read_answer(s)
            assert (status, json.loads(body)["error"]["type"]) == (504, "deadline_exceeded")


def test_every_request_scope_carries_its_arrival(server):
    seen = []
    app = server.app
    inner = app.middleware_stack

    async def spy(scope, receive, send):
        if scope["type"] == "http":
            seen.append(scope.get(ARRIVAL_KEY))
        await inner(scope, receive, send)

    import httpx

    app.middleware_stack = spy
    try:
        before = time.monotonic()
        httpx.get(server.url + "/healthz")
    finally:
        app.middleware_stack = inner
    assert seen and before <= seen[0] <= time.monotonic()


def hold_shedding(shed) -> Refusing:
    """Congested, for an interval long enough for the test, and the application at its
    limit (whatever it holds leaves no time): the protocol refuses unparsed. The engine
    refuses too; its fake is returned."""
    fake = Refusing(shed.engine)
    shed.engine = fake
    shed.interval = 60.0
    shed._window, shed.congested, shed.cap = time.monotonic(), True, 0
    shed.limit = lambda budget: 0
    return fake


def test_while_shedding_a_request_is_refused_unparsed_and_counted():
    from tests.conftest import serve

    with serve(metrics=True) as srv:
        shed = srv.services.shed
        fake = hold_shedding(shed)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            for _ in range(3):  # keep-alive: answered from the raw bytes, connection kept
                s.sendall(_post(256))
                status, headers, body = _read_answer(s)
                assert status == 503 and int(headers["retry-after"]) >= 1
                assert headers["x-request-id"] and "close" not in headers.get("connection", "")
                assert json.loads(body)["error"]["type"] == "predicted_late"
            s.sendall(_post(256).replace(b"/v1/activations/relu?", b"/v2/models/relu/infer?"))
            status, _, body = _read_answer(s)
            assert status == 503 and "overloaded" in json.loads(body)["error"]
            # a Host the server does not serve is never refused as overload: its own 400
            s.sendall(_post(256).replace(b"Host: 127.0.0.1", b"Host: evil.example"))
            status, _, body = _read_answer(s)
            assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_post(1 << 18, body=False))  # a MiB declared, not sent yet
            status, headers, _ = _read_answer(s)  # answered before the body
            assert status == 503 and "close" not in headers.get("connection", "")
            # the body then arrives and is dropped unparsed; the next request is read
            s.sendall(_post(1 << 18)[len(_post(1 << 18, body=False)):] + _post(64))
            status, _, body = _read_answer(s)
            assert status == 503 and json.loads(body)["error"]["type"] == "predicted_late"
        import httpx

        metrics = httpx.get(srv.url + "/metrics").text  # counted when scraped
        assert _rejections(metrics, "predicted_late") == 6
        assert _stage(metrics, "unparsed") == 6 and _stage(metrics, "unparsed_admission") == 0
        shed.cap = 1 << 30
        del shed.limit
        fake.on = False
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_post(256))
            assert _read_answer(s)[0] == 200


def test_the_unparsed_path_remembers_request_lines_and_hosts_within_a_bound():
    from service.http.shed import MEMO_MAX

    shed = _shed(FakeEngine(), allowed_hosts="api.example", default_timeout_s=30)
    assert shed.route(b"/v1/activations/gelu?shape=4&timeout=0.25") == (
        "native", "gelu", {"timeout": "0.25"}, 0.25)  # the keys admission reads
    assert shed.route(b"/v1/activations/my%5Fgate?shape=4") == (
        "native", "my_gate", {}, 30.0)  # unquoted; the default timeout
    assert shed.route(b"/v2/models/relu/versions/1/infer?timeout=0.25") == (
        "v2", "relu", {}, 30.0)  # v2's timeout is in its body
    for other in (b"/v1/activations", b"/v1/activations/a/b", b"/v1/custom",
                  b"/v1/activations/"):
        assert shed.route(other) is None
    for i in range(3 * MEMO_MAX):  # client-chosen targets: the memo never grows past its bound
        shed.route(b"/v1/activations/gelu?timeout=%d" % (i + 1))
        assert len(shed._routes) <= MEMO_MAX
    assert shed.route(b"/v1/activations/gelu?timeout=7")[3] == 7.0
    assert shed.host_ok(b"\r\nhost: api.example:8000\r\ncontent-length: 4")
    assert not shed.host_ok(b"\r\nhost: evil.example\r\ncontent-length: 4")
    assert not shed.host_ok(b"\r\ncontent-length: 4")  # no Host at all
    for i in range(3 * MEMO_MAX):
        assert not shed.host_ok(b"\r\nhost: h%d.example" % i)
        assert len(shed._hosts) <= MEMO_MAX
    assert shed.host_ok(b"\r\nhost: api.example")  # still decided right after the clears


def test_a_protocol_answer_carries_the_servers_current_default_headers():
    """The default headers (the date changes each second) are joined once per list the
    server makes, not per answer, and a new list is seen at once."""
    from types import SimpleNamespace

    from service.http.shed import ShedConnection

    conn = ShedConnection()
    conn.shed = _shed(FakeEngine())
    conn.server_state = SimpleNamespace(default_headers=[(b"date", b"d1"), (b"server", b"s")])
    first = conn._answer(503, b"{}", b"id-1", 2, keep_alive=True)
    assert first.startswith(b"HTTP/1.1 503 ") and b"\r\ndate: d1\r\nserver: s\r\n" in first
    assert b"retry-after: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")
    conn.server_state.default_headers = [(b"date", b"d2"), (b"server", b"s")]
    second = conn._answer(503, b"{}", b"id-2", None, keep_alive=False)
    assert b"date: d2\r\n" in second and b"date: d1" not in second
    assert b"connection: close\r\n" in second and b"retry-after" not in second


def test_unparsed_a_remembered_route_sees_an_activation_registered_since():
    """The route of a request line is remembered, its activation looked up at each use: a
    custom activation registered after its name was first asked for is refused unparsed
    at once (before, the application answered 404)."""
    import httpx

    from tests.conftest import serve

    def post(name: str) -> bytes:
        return _post(4).replace(b"/v1/activations/relu?", f"/v1/activations/{name}?".encode())

    with serve(metrics=True) as srv:
        shed = srv.services.shed
        hold_shedding(shed)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(post("late_sq"))
            status, _, body = _read_answer(s)
            assert status == 404, body
            assert any(b"/v1/activations/late_sq?" in line for line in shed._routes)
            r = httpx.post(srv.url + "/v1/activations", json={"name": "late_sq", "expr": "x*x"})
            assert r.status_code == 201, r.text
            unparsed = shed._unflushed  # refusals made from the raw bytes, not yet scraped
            s.sendall(post("late_sq"))
            status, headers, body = _read_answer(s)
            assert status == 503 and json.loads(body)["error"]["type"] == "predicted_late"
            assert "close" not in headers.get("connection", "")
            assert shed._unflushed == unparsed + 1  # unparsed, not by the parser's path


def test_answers_made_from_the_raw_bytes_have_access_log_lines_with_their_ids(caplog):
    import logging

    from tests.conftest import serve
    from tests.test_hardening import _access_lines

    caplog.set_level(logging.INFO, logger="actserve.access")
    with serve(access_log=True) as srv:
        hold_shedding(srv.services.shed)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_post(4).replace(b"/relu?", b"/re%6Cu?"))  # relu, percent-encoded
            status, refused, _ = _read_answer(s)
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            probe_status, probed, _ = _read_answer(s)
    assert status == 503 and probe_status in (200, 503)
    lines = {line.get("id"): line for line in _access_lines(caplog)}
    line = lines[refused["x-request-id"]]
    assert (line["status"], line["path"], line["activation"], line["error"]) == (
        503, "/v1/activations/relu", "relu", "predicted_late")  # decoded, as the app logs
    assert line["client"] == "127.0.0.1" and line["method"] == "POST"
    assert lines[probed["x-request-id"]]["path"] == "/readyz"


def test_while_congested_the_probes_are_answered_unparsed_as_their_routes_answer():
    from tests.conftest import serve

    def get(s: socket.socket, path: str, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return _read_answer(s)

    with serve() as srv:
        shed = srv.services.shed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            routed = {p: get(s, p) for p in ("/healthz", "/readyz")}  # not congested
            shed.interval, shed._window, shed.congested = 60.0, time.monotonic(), True
            for path, (status, _, body) in routed.items():  # the same answers, unparsed
                got_status, headers, got = get(s, path)
                assert (got_status, got) == (status, body) and headers["x-request-id"]
            assert json.loads(routed["/readyz"][2])["status"] == "ready"
            assert get(s, "/readyz", host="evil.example")[0] == 400  # the guard's, routed
            engine = shed.engine

            class NotReadyEngine:
                ready = False
                devices = engine.devices

                def not_ready_reason(self) -> str:
                    return "warming up"

            services = srv.services
            answer = services.readiness  # the route's, the protocol's and the probe port's
            services.readiness = probe_port.answers(NotReadyEngine())
            status, headers, body = get(s, "/readyz")
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"] == {"type": "not_ready",
                                                 "message": "not ready: warming up"}
            # a worker of several: the others' flags (slot 1 not ready), unparsed and routed
            services.readiness = probe_port.answers(engine, others=lambda: [1])
            for congested in (True, False):
                shed.congested = congested
                status, _, body = get(s, "/readyz")
                assert status == 503 and json.loads(body)["error"]["message"] == \
                    "not ready: worker slot(s) [1] not ready"
            services.readiness = answer
            assert get(s, "/readyz")[0] == 200
