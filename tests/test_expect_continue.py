"""Clients that send ``Expect: 100-continue`` hold their body back until the server's
``100 Continue`` (curl does for large bodies). A refusal before the body then costs neither
side the body, but the body is never sent: keeping the connection and skipping "the rest of
the body" would read the client's next request as that body. Such refusals close the
connection (service/http/header_timeout.py ``close_unless_continued``; the protocol's
unparsed refusals in service/http/shed.py); a request the server reads is answered
``100 Continue`` and its connection kept. A real server on 127.0.0.1, raw sockets."""

from __future__ import annotations

import json
import socket

import numpy as np

from tests.conftest import serve
from tests.test_shed import _read_answer, hold_shedding


def expect_post(n: int, path: str = "/v1/activations/relu") -> bytes:
    return (f"POST {path}?shape={n}&dtype=float32&timeout=5 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {4 * n}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()


def closed_after(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's timeout bounds
    the wait); a close with bytes the server never read arrives as a reset."""
    rest = b""
    try:
        while chunk := s.recv(65536):
            rest += chunk
    except ConnectionResetError:
        pass
    return rest


def test_a_refusal_before_the_body_closes_the_connection_of_a_client_awaiting_100():
    with (serve(max_request_bytes=100_000) as srv,
          socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s):
        s.sendall(expect_post(1 << 18))  # a MiB declared: over the limit, not sent
        status, headers, body = _read_answer(s)  # no "100 Continue" first
        assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"
        assert headers.get("connection") == "close"
        assert closed_after(s) == b""  # closed: nothing read as the next request


def test_an_unparsed_overload_refusal_closes_the_connection_of_a_client_awaiting_100():
    with serve() as srv:
        hold_shedding(srv.services.shed)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(expect_post(1 << 18))
            status, headers, body = _read_answer(s)
            assert status == 503 and json.loads(body)["error"]["type"] == "predicted_late"
            assert headers.get("connection") == "close"
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # too late
            assert closed_after(s) == b""  # never taken for the refused request's body


def test_a_request_the_server_reads_gets_100_continue_and_keeps_its_connection():
    x = np.linspace(-3, 3, 256, dtype="<f4")
    with serve() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        for _ in range(2):  # the same connection, twice
            s.sendall(expect_post(256))
            assert s.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(x.tobytes())
            status, headers, body = _read_answer(s)
            assert status == 200 and "close" not in headers.get("connection", "")
            assert np.frombuffer(body, "<f4").tobytes() == np.maximum(x, 0).tobytes()
