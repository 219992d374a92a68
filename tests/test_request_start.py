"""``X-Request-Start``: with ``trust_request_start`` on, a request's deadline counts from
its caller's stamp when that is earlier than the arrival the server stamps itself, so time
spent before the server read it (the accept queue, a body held back by TCP, a proxy) is not
invisible: a request already past its deadline is answered 504 ``deadline_exceeded`` and
never computed, over HTTP (by the protocol before the body, or by the request sequence) and
gRPC (service/exchange/request_start.py)."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from service.exchange import request_start
from tests.conftest import free_port, serve
from tests.inprocess import in_process
from tests.test_shed import _read_answer

X = np.linspace(-3, 3, 256, dtype="<f4")


# -- the stamp ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [
    ("t=1733500000.123", 1733500000.123),  # nginx's t=${msec}
    (b"t=1733500000123", 1733500000.123),  # milliseconds (Heroku)
    ("1733500000123456", 1733500000.123456),  # microseconds, no t=
    (" t=1733500000123456789 ", 1733500000.123456789),  # nanoseconds
    ("1733500000", 1733500000.0),
])
def test_a_stamp_is_read_in_seconds_whatever_its_unit(value, seconds):
    assert request_start.parse(value) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("value", ["", "t=", "soon", "t=-5", "0", "inf", "nan", "1e40"])
def test_what_is_not_a_stamp_is_ignored(value):
    assert request_start.parse(value) is None
    assert request_start.moved(7.0, value) == (7.0, None)


@given(st.one_of(st.binary(max_size=64), st.text(max_size=64),
                 st.floats(allow_nan=True).map(lambda f: f"t={f!r}")))
@settings(max_examples=300, deadline=None)
def test_any_header_value_is_a_stamp_in_seconds_or_nothing(value):
    stamp = request_start.parse(value)  # never raises, whatever a client sends
    assert stamp is None or 0 < stamp < 1e11
    arrived, wait = request_start.moved(100.0, value)
    assert arrived <= 100.0 and (wait is None) == (stamp is None)


def test_an_earlier_stamp_moves_the_arrival_back_and_a_later_one_changes_nothing():
    wall, mono = (lambda: 1_000_000.0), (lambda: 500.0)  # fake clocks: the same instant
    # arrived 0.1 s ago on the monotonic clock, stamped 2 s ago on the wall clock: it
    # waited 1.9 s before the server read it
    arrived, wait = request_start.moved(499.9, "t=999998.0", wall, mono)
    assert arrived == pytest.approx(498.0) and wait == pytest.approx(1.9)
    # a stamp after the arrival (a clock ahead, or time in the server) is not taken
    assert request_start.moved(499.9, "t=999999.95", wall, mono) == (499.9, 0.0)
    assert request_start.moved(499.9, "t=1000003", wall, mono) == (499.9, 0.0)
    assert request_start.moved(499.9, None, wall, mono) == (499.9, None)


def test_the_servers_trust_counts_each_stamped_requests_wait():
    waits: list[float] = []
    starts = request_start.Starts(waits.append, wall=lambda: 1_000_000.0, mono=lambda: 500.0)
    assert starts.apply(499.9, b"t=999998.0") == pytest.approx(498.0)
    assert starts.apply(499.9, b"t=1000003") == 499.9  # later: a wait of 0
    assert starts.apply(499.9, b"garbage") == 499.9  # not a stamp: not counted
    assert starts.apply(499.9, None) == 499.9
    assert waits == [pytest.approx(1.9), 0.0]


# -- over HTTP ----------------------------------------------------------------------------
def stamp(seconds_ago: float) -> str:
    return f"t={int((time.time() - seconds_ago) * 1e6)}"


def post(url: str, seconds_ago: float | None, timeout: float = 1.0,
         client: httpx.Client | None = None) -> httpx.Response:
    headers = {"content-type": "application/octet-stream"}
    if seconds_ago is not None:
        headers[request_start.HEADER] = stamp(seconds_ago)
    send = client.post if client is not None else httpx.post
    return send(f"{url}/v1/activations/relu?shape={X.size}&dtype=float32&timeout={timeout}",
                content=X.tobytes(), headers=headers, timeout=30)


def batches(url: str) -> float:
    """relu's batches executed, from the server's own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in
               re.finditer(r'^actserve_batches_total\{activation="relu"[^}]*\} (\S+)$', text, re.M))


def test_a_request_its_stamp_puts_past_its_deadline_is_504_and_never_computed():
    with serve(trust_request_start=True, metrics=True) as srv:
        before = batches(srv.url)
        r = post(srv.url, seconds_ago=2.0)  # 1 s timeout, started 2 s ago: late already
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["type"] == "deadline_exceeded" and "X-Request-Start" in err["message"]
        assert batches(srv.url) == before  # not computed
        # still within its time (30 s timeout), a stamp counts and the request is served
        ok = post(srv.url, seconds_ago=2.0, timeout=30)
        assert ok.status_code == 200
        assert ok.content == np.maximum(X, 0).tobytes()
        ahead = post(srv.url, seconds_ago=-60.0, timeout=5)  # a stamp in the future: served
        assert ahead.status_code == 200
        assert batches(srv.url) > before
        # the waits the stamps showed, in the server's metrics: three stamped requests,
        # two of them 2 s before the server read them
        text = httpx.get(f"{srv.url}/metrics", timeout=30).text
        count = re.search(r"^actserve_request_start_wait_seconds_count (\S+)$", text, re.M)
        over = re.search(r'^actserve_request_start_wait_seconds_bucket\{le="1.0"\} (\S+)$',
                         text, re.M)
        assert float(count.group(1)) == 3 and float(over.group(1)) == 1


def test_without_trust_the_stamp_is_ignored():
    with serve() as srv:
        r = post(srv.url, seconds_ago=60.0)
        assert r.status_code == 200 and r.content == np.maximum(X, 0).tobytes()


def test_a_stale_large_request_is_refused_before_its_body_is_sent():
    n = 1 << 18  # a MiB declared, never sent: the answer comes from the headers alone
    head = (f"POST /v1/activations/relu?shape={n}&dtype=float32&timeout=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"X-Request-Start: {stamp(5.0)}\r\nContent-Length: {4 * n}\r\n\r\n").encode()
    with (serve(trust_request_start=True) as srv,
          socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s):
        s.sendall(head)
        status, headers, body = _read_answer(s)
        assert status == 504 and json.loads(body)["error"]["type"] == "deadline_exceeded"
        assert headers.get("connection") == "close"  # its body is not read


def test_the_request_sequence_applies_the_stamp_where_no_protocol_stamped_the_arrival():
    # in process: no HTTP protocol stamps the arrival; the HTTP source does, and the job's
    # deadline (the v2 timeout is in the body) counts from the stamp
    with in_process(trust_request_start=True) as app, app.client() as c:
        assert post("", seconds_ago=2.0, client=c).status_code == 504
        big = np.zeros(1 << 18, "<f4")  # large: checked before its body is read
        r = c.post(f"/v1/activations/relu?shape={big.size}&dtype=float32&timeout=1",
                   content=big.tobytes(), headers={"content-type": "application/octet-stream",
                                                   request_start.HEADER: stamp(2.0)})
        assert r.status_code == 504 and "X-Request-Start" in r.json()["error"]["message"]
        body = {"inputs": [{"name": "input", "shape": [3], "datatype": "FP32",
                            "data": [-1.0, 0.0, 2.0]}],
                "parameters": {"timeout": 1_000_000}}  # microseconds, as Triton's
        v2 = c.post("/v2/models/relu/infer", json=body,
                    headers={request_start.HEADER: stamp(2.0)})
        assert v2.status_code == 504 and "deadline" in v2.json()["error"]
        body["parameters"]["timeout"] = 30_000_000  # the same stamp within a longer timeout
        assert c.post("/v2/models/relu/infer", json=body,
                      headers={request_start.HEADER: stamp(2.0)}).status_code == 200
        # where they were refused: the large one before its body was read, the small one
        # and the v2 one (its timeout in its body) at submit, once read
        text = c.get("/metrics").text
        stages = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^actserve_overload_refusals_total\{stage="(\w+)"\} (\S+)$', text, re.M)}
        assert {k: v for k, v in stages.items() if v} == {"before_body": 1, "queued": 2}


class _LateSource:
    """A ``sequence.Source`` whose wait ends after its job's deadline: as if the server
    were so busy that the answer was ready only after it (no clock is waited on)."""

    api = "native"

    def __init__(self) -> None:
        self.arrived = time.monotonic()
        self.encoded = False

    def hint(self, now):
        return None

    def declared_size(self, limit):
        return 4 * X.size

    def lend(self, engine, size):
        return None

    async def read(self, size, granted, lent):
        return X.tobytes(), granted, size

    async def decode(self, body, activation, jobs):
        from service.engine.job import Job, Mode

        job = Job(activation=activation, params=(), array=np.frombuffer(body, "<f4").copy(),
                  wire_dtype="float32", mode=Mode(None, False, None, False),
                  deadline=self.arrived + 1.0)
        return job, None

    async def wait(self, engine, job):
        from service.engine.job import JobResult

        job.deadline = time.monotonic() - 0.001  # its deadline passed while it waited
        return JobResult(array=np.maximum(job.array, 0), dtype="float32", compute_s=0.0,
                         batch_requests=1, batch_elements=X.size, device="cpu")

    async def encode(self, job, answer, result):
        self.encoded = True
        return type("Encoded", (), {"nbytes": result.array.nbytes})()

    def respond(self, encoded, result, headers):
        return "200"

    def gone(self):
        return None


def test_an_answer_ready_after_its_deadline_is_504_never_200():
    import asyncio

    from service.errors import DeadlineExceeded
    from service.exchange import sequence

    with in_process() as app:
        source = _LateSource()
        run = sequence.run(app.services, source, "relu", {"request_id": "late-1"})
        with pytest.raises(DeadlineExceeded, match="answer was dropped"):
            asyncio.run_coroutine_threadsafe(run, app.loop).result(30)
        assert source.encoded  # it got that far: only the answer is refused
        metrics = app.services.recorder.metrics
        assert metrics.child(metrics.overload_stages, "answer").value == 1  # counted there


# -- over gRPC ----------------------------------------------------------------------------
def test_grpc_metadata_stamp_counts_the_same_way():
    port = free_port()
    tensor = tg.InferInput("input", [3], "FP32")
    tensor.set_data_from_numpy(np.array([-1.0, 0.0, 2.0], np.float32))
    with (serve(grpc_port=port, trust_request_start=True) as _srv,
          tg.InferenceServerClient(f"127.0.0.1:{port}") as c):
        # no timeout asked: the server's default (30 s) counts from a stamp 60 s old
        with pytest.raises(InferenceServerException) as late:
            c.infer("relu", [tensor], headers={request_start.HEADER: stamp(60.0)})
        assert "DEADLINE_EXCEEDED" in str(late.value.status())
        fresh = c.infer("relu", [tensor], headers={request_start.HEADER: stamp(1.0)})
        assert fresh.as_numpy("output").tolist() == [0.0, 0.0, 2.0]


# -- the Python client ------------------------------------------------------------------
class _Recording(httpx.HTTPTransport):
    """A real HTTP transport that keeps each request's X-Request-Start."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[str | None] = []

    def handle_request(self, request):
        self.stamps.append(request.headers.get(request_start.HEADER))
        return super().handle_request(request)


def test_the_client_stamps_each_try_with_its_send_time_when_asked(monkeypatch):
    import types

    import actserve_client
    from actserve_client import _sync

    x = np.array([-1.0, 2.0], np.float32)
    with serve(trust_request_start=True) as srv:
        plain = _Recording()
        with actserve_client.Client(srv.url, transport=plain) as c:
            assert c.activate("relu", x).tolist() == [0.0, 2.0]
        assert plain.stamps == [None]  # off by default
        rec = _Recording()
        with actserve_client.Client(srv.url, transport=rec, stamp_start=True,
                                    max_retries=0) as c:
            before = time.time()
            assert c.activate("relu", x, timeout=5).tolist() == [0.0, 2.0]
            after = time.time()
            assert before - 1e-6 <= request_start.parse(rec.stamps[-1]) <= after
            # the same call, its clock 5 s back: the server counts its 1 s from then
            back = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                            if not k.startswith("_")})
            back.time = lambda: time.time() - 5.0
            monkeypatch.setattr(_sync, "time", back)
            with pytest.raises(actserve_client.DeadlineExceededError, match="deadline"):
                c.activate("relu", x, timeout=1)


def test_the_async_client_stamps_too():
    import asyncio

    import actserve_client

    seen: list[str | None] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            seen.append(request.headers.get(request_start.HEADER))
            return await super().handle_async_request(request)

    async def go(url: str) -> list:
        async with actserve_client.AsyncClient(url, transport=Recording(),
                                               stamp_start=True) as c:
            return (await c.activate("relu", np.array([-1.0, 2.0], np.float32))).tolist()

    with serve(trust_request_start=True) as srv:
        before = time.time()
        assert asyncio.run(go(srv.url)) == [0.0, 2.0]
        assert before - 1e-6 <= request_start.parse(seen[-1]) <= time.time()
