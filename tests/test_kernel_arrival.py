"""A new connection's first request is dated from when its bytes reached the kernel
(``service/http/kernel_arrival.py``): its wait in the accept queue counts against its
deadline, and a request already past it is answered 504 without being computed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import time

import httpx
import pytest

from service.http import kernel_arrival
from tests.conftest import serve
from tests.test_shed import Refusing, _post, _read_answer

linux_only = pytest.mark.skipif(kernel_arrival.TCP_INFO is None, reason="TCP_INFO is Linux's")


class _Info:
    """A socket whose ``TCP_INFO`` says data last arrived ``ms`` milliseconds ago."""

    def __init__(self, ms: int, size: int = 104) -> None:
        self.raw = bytearray(max(size, 56))
        struct.pack_into("=I", self.raw, 52, ms)
        self.raw = self.raw[:size]
        self.asked = []

    def getsockopt(self, level, option, size):
        self.asked.append((level, option, size))
        return bytes(self.raw[:size])


@linux_only
def test_the_wait_is_read_from_tcp_info_last_data_recv():
    sock = _Info(1234)
    assert kernel_arrival.waited(sock) == 1.234
    assert sock.asked == [(socket.IPPROTO_TCP, socket.TCP_INFO, 56)]
    assert kernel_arrival.waited(_Info(5, size=40)) == 0.0  # a short struct: unknown


def test_what_cannot_be_read_is_no_wait():
    class Unix:
        def getsockopt(self, *args):
            raise OSError(95, "Operation not supported")

    assert kernel_arrival.waited(None) == 0.0
    assert kernel_arrival.waited(Unix()) == 0.0


@linux_only
def test_on_a_real_socket_it_is_the_time_the_bytes_waited_never_more():
    """A connection left in the accept queue with its request in the kernel: the wait
    read when it is accepted covers that time (the kernel's clock ticks in milliseconds to
    10 ms), and never more than it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        try:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            sent = time.monotonic()
            # the bytes left in the kernel for a while (the quantity measured, not a race)
            while time.monotonic() - sent < 0.08:
                time.sleep(0.01)
            conn, _ = listener.accept()
            with conn:
                wait = kernel_arrival.waited(conn)
                elapsed = time.monotonic() - sent
        finally:
            client.close()
    assert 0.08 - 0.011 <= wait <= elapsed + 0.011


def _batches(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in
               re.finditer(r'^actserve_batches_total\{activation="relu"[^}]*\} (\S+)$', text, re.M))


def _timed(raw: bytes, timeout: float) -> bytes:
    return raw.replace(b"&timeout=5 ", f"&timeout={timeout:g} ".encode(), 1)


def test_a_first_request_that_waited_past_its_deadline_is_504_and_never_computed(monkeypatch):
    """The kernel says a new connection's bytes waited 2 s; its first request has a 1 s
    timeout: 504 at once, not computed. The same connection's next request is dated by its
    own read (served), and a request that waited less than its timeout is served too."""
    reads = []

    def waited(sock):
        reads.append(sock)
        return 2.0

    monkeypatch.setattr(kernel_arrival, "waited", waited)
    with serve(metrics=True) as srv:
        before = _batches(srv.url)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_timed(_post(256), 1))
            status, _, body = _read_answer(s)
            assert status == 504 and json.loads(body)["error"]["type"] == "deadline_exceeded"
            assert _batches(srv.url) == before  # never computed (its own connection)
            n = len(reads)
            s.sendall(_timed(_post(256), 1))  # the same connection: not dated again
            status, _, body = _read_answer(s)
            assert status == 200 and len(body) == 4 * 256
            assert len(reads) == n  # TCP_INFO read once a connection, not per request
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_timed(_post(256), 5))  # waited 2 s of its 5: served
            assert _read_answer(s)[0] == 200
            assert len(reads) == n + 1


def test_the_raw_bytes_refusal_dates_a_first_request_the_same_way(monkeypatch):
    """While the engine is busy the protocol decides from the raw bytes; a new
    connection's first request that waited past its deadline is answered 504 there."""
    monkeypatch.setattr(kernel_arrival, "waited", lambda sock: 2.0)
    with serve(metrics=True) as srv:
        shed = srv.services.shed
        fake = shed.engine = Refusing(shed.engine)
        fake.admit = lambda hint=None: None  # busy, but admitting: only the date refuses
        parsed = []
        real_refusal = shed.refusal
        shed.refusal = lambda *args: parsed.append(args) or real_refusal(*args)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_timed(_post(256), 1))
            status, _, body = _read_answer(s)
            assert status == 504 and json.loads(body)["error"]["type"] == "deadline_exceeded"
            metrics = srv.services.recorder.metrics
            assert parsed == []  # from the raw bytes, not by the application after them:
            assert metrics.child(metrics.overload_stages, "unparsed_admission").value == 1
            assert metrics.child(metrics.overload_stages, "before_body").value == 0
            s.sendall(_timed(_post(256), 1))  # the next one is not dated again: served
            assert _read_answer(s)[0] == 200


def test_off_the_kernel_is_not_asked(monkeypatch):
    monkeypatch.setattr(kernel_arrival, "waited", lambda sock: pytest.fail("asked"))
    with (serve(kernel_arrival=False) as srv,
          socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s):
        s.sendall(_timed(_post(256), 1))
        assert _read_answer(s)[0] == 200


def test_the_listeners_backlog_is_the_setting():
    """``backlog``: how many completed connections the kernel queues for the server to
    accept; past it the kernel drops handshakes, and those waits no one can date (the
    client sends its SYN again a second later)."""
    from types import SimpleNamespace

    from service.http.server import uvicorn_config
    from service.settings import Settings

    assert Settings().backlog == 4096
    assert uvicorn_config(SimpleNamespace(state=SimpleNamespace()),
                          Settings(backlog=77)).backlog == 77


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_the_kernel_holds_the_listener_to_that_backlog():
    """Read back from the kernel: a listening socket's Send-Q in ``ss`` is its backlog."""
    with serve(backlog=77) as srv:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{srv.port}"], capture_output=True,
                             text=True, timeout=30).stdout.split()
        assert out[0] == "LISTEN" and out[2] == "77", out  # State Recv-Q Send-Q ...
