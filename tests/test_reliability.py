"""Limits, slow clients, disconnects, overload and security, each with a test that would
catch its failure. Raw sockets where the behaviour is below what an HTTP client exposes."""

from __future__ import annotations

import ast
import asyncio
import socket
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import ROOT, reference, same_bits, serve, subprocess_server
from .gates import block_executor, held, submissions, wait_for
from .test_fuzz import rss_kib

BIN = {"content-type": "application/octet-stream"}


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _read_status(s: socket.socket) -> int | None:
    """The status of the response on ``s``, or None if the server closed without one."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return None
        data += chunk
    return int(data.split(b" ", 2)[1])


# -- limits ------------------------------------------------------------------------------
def test_huge_declared_content_length_is_refused_without_reading(server):
    s = _connect(server.url)
    t0 = time.perf_counter()
    s.sendall(b"POST /v1/activations/relu?shape=1 HTTP/1.1\r\nHost: localhost\r\n"
              b"Content-Type: application/octet-stream\r\nContent-Length: 10000000000\r\n\r\n")
    assert _read_status(s) == 413
    assert time.perf_counter() - t0 < 5
    s.close()


def test_endless_chunked_body_is_cut_off_at_the_limit():
    with serve(max_request_bytes=64 * 1024) as srv:
        s = _connect(srv.url)
        s.sendall(b"POST /v1/activations/relu?shape=1 HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4096, b"\0" * 4096)
        sent = 0
        status = None
        try:
            for _ in range(10_000):  # bounded: 40 MB at most
                s.sendall(chunk)
                sent += 4096
                s.settimeout(0.0)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    data = b""
                s.settimeout(10)
                if data:
                    status = int(data.split(b" ", 2)[1])
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
        assert sent <= 4 * 1024 * 1024, "the server kept reading far past its limit"
        assert status in (413, None)
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_slow_headers_are_cut_off_and_others_are_served():
    with serve(header_timeout_s=0.5) as srv:
        slow = _connect(srv.url)
        slow.sendall(b"POST /v1/activations/relu HTTP/1.1\r\nHost: localhost\r\n")  # never finishes
        t0 = time.perf_counter()
        ok = httpx.post(srv.url + "/v1/activations/relu", json={"data": [-1.0, 2.0]})
        assert ok.status_code == 200 and ok.json()["data"] == [0.0, 2.0]
        slow.settimeout(10)
        assert slow.recv(1) == b""  # closed by the server
        assert time.perf_counter() - t0 < 5
        slow.close()


def test_header_deadline_spares_connections_that_finish_their_headers():
    """A kept-alive connection idle for longer than the header timeout between requests,
    and one whose headers arrive in pieces inside it, are both served."""
    with serve(header_timeout_s=0.5) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.post("/v1/activations/relu", json={"data": [1.0]}).status_code == 200
        time.sleep(1.0)  # the scenario: idle between requests, longer than header_timeout_s
        assert c.post("/v1/activations/relu", json={"data": [-1.0]}).json()["data"] == [0.0]
        body = b'{"data": [3.0]}'
        s = _connect(srv.url)
        s.sendall(b"POST /v1/activations/relu HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.2)  # the scenario: headers in two pieces, inside the deadline
        s.sendall(b"Content-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()


def test_slow_body_gets_408():
    with serve(body_timeout_s=0.5) as srv:
        s = _connect(srv.url)
        s.sendall(b"POST /v1/activations/relu?shape=4 HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/octet-stream\r\nContent-Length: 16\r\n\r\n\0\0\0\0")
        assert _read_status(s) == 408
        s.close()


# -- disconnects -------------------------------------------------------------------------
def test_client_that_disconnects_frees_its_slot_and_is_never_computed():
    with serve() as srv:
        rt = srv.engine

        def batches(name: str) -> float:
            text = httpx.get(srv.url + "/metrics").text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("actserve_batches_total{") and f'"{name}"' in line)

        before = batches("softsign")

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                async with held(rt, 2):
                    filler = asyncio.ensure_future(c.post("/v1/activations/relu", json={"data": [1]}))
                    await wait_for(lambda: submissions(rt).count >= 1 and not rt.batcher.waiting)
                    s = _connect(srv.url)
                    body = b'{"data": [1.0]}'
                    s.sendall(b"POST /v1/activations/softsign HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
                    await wait_for(lambda: rt.batcher.waiting == 1)
                    s.close()  # the client goes away while its job waits
                    await wait_for(lambda: rt.batcher.waiting == 0)  # slot freed at once
                assert (await filler).status_code == 200

        asyncio.run(run())
        assert batches("softsign") == before  # never computed
        assert httpx.post(srv.url + "/v1/activations/softsign", json={"data": [1.0]}).json()[
            "data"] == [0.5]


# -- overload ----------------------------------------------------------------------------
def test_overload_refuses_fast_and_serves_accepted_requests_correctly(capsys):
    """A bounded burst at many times capacity: every answer is a correct 200 or a fast 503
    with Retry-After; the server stays ready and its memory flat. Prints the figures."""
    x = np.random.default_rng(5).standard_normal(65_536).astype("<f4")
    expected = reference("gelu", x, "float32")[0]
    env = {"ACTSERVE_MAX_QUEUE_REQUESTS": "16", "ACTSERVE_MAX_BATCH_REQUESTS": "8"}
    with subprocess_server(env) as (proc, url):
        rss_before = rss_kib(proc.pid)
        results: list[tuple[int, float, bool, str | None]] = []

        async def client(c: httpx.AsyncClient, stop: float):
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post("/v1/activations/gelu", params={"shape": str(x.size)},
                                 content=x.tobytes(), headers=BIN)
                ok = r.status_code == 200 and same_bits(np.frombuffer(r.content, "<f4"), expected)
                results.append((r.status_code, time.perf_counter() - t0, ok,
                                r.headers.get("retry-after")))

        async def run():
            limits = httpx.Limits(max_connections=128)
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
                stop = time.perf_counter() + 4.0  # bounded in time
                await asyncio.gather(*(client(c, stop) for _ in range(64)))

        asyncio.run(run())
        ready = httpx.get(url + "/readyz").status_code
        rss_growth_mib = (rss_kib(proc.pid) - rss_before) / 1024
    statuses = {s for s, *_ in results}
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert statuses <= {200, 503}, statuses
    assert accepted and refused, "the burst should both be served and refused"
    assert all(r[2] for r in accepted), "an accepted request got a wrong answer"
    assert all(r[3] for r in refused), "a 503 without Retry-After"
    p50_ok = statistics.median(r[1] for r in accepted) * 1000
    p50_refused = statistics.median(r[1] for r in refused) * 1000
    max_ok = max(r[1] for r in accepted) * 1000
    with capsys.disabled():
        print(f"\noverload: {len(results)} requests in 4 s from 64 clients; "
              f"{len(accepted)} served (p50 {p50_ok:.1f} ms, max {max_ok:.1f} ms), "
              f"{len(refused)} refused (p50 {p50_refused:.1f} ms); RSS +{rss_growth_mib:.1f} MiB")
    assert ready == 200
    assert max_ok < 10_000  # the bounded queue bounds accepted latency
    assert p50_refused < p50_ok  # a refusal is cheaper than service
    assert rss_growth_mib < 256


# -- security ----------------------------------------------------------------------------
def test_bearer_token_auth_when_configured():
    with serve(api_keys="k1,secret-two") as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/v1/activations/relu", json={"data": [1.0]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "unauthorized"
        bad = c.post("/v1/activations/relu", json={"data": [1.0]},
                     headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401
        basic = c.post("/v1/activations/relu", json={"data": [1.0]},
                       headers={"authorization": "Basic secret-two"})
        assert basic.status_code == 401
        v2 = c.get("/v2/models/relu")
        assert v2.status_code == 401 and isinstance(v2.json()["error"], str)
        good = c.post("/v1/activations/relu", json={"data": [-1.0]},
                      headers={"authorization": "Bearer secret-two"})
        assert good.status_code == 200 and good.json()["data"] == [0.0]
        for open_path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(open_path).status_code == 200, open_path


def test_cors_is_off_by_default_and_on_when_listed(client):
    pre = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    r = client.options("/v1/activations/relu", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with serve(cors_origins="https://app.example") as srv:
        r = httpx.options(srv.url + "/v1/activations/relu",
                          headers={**pre, "origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # the hot routes' fast path sits inside CORS too: the answer itself carries it
        r = httpx.post(srv.url + "/v1/activations/relu", params={"shape": "2"},
                       content=np.ones(2, "<f4").tobytes(),
                       headers={**BIN, "origin": "https://app.example"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_error_messages_echo_only_a_bounded_slice_of_input(client):
    long = "A" * 100_000
    for r in (
        client.post("/v1/activations/relu", json={"data": [1], "params": {long: 1}}),
        client.post("/v1/activations/relu", json={"data": [1], "dtype": long}),
        client.post(f"/v1/activations/{long[:5000]}", json={"data": [1]}),
        client.post("/v1/activations/relu", params={"shape": long[:8000]}, content=b"",
                    headers=BIN),
    ):
        assert r.status_code in (400, 404)
        assert len(r.text) < 600, r.text[:200]


def test_no_endpoint_evaluates_code_or_unpickles():
    banned_calls = {"eval", "exec", "compile", "__import__"}
    banned_modules = {"pickle", "marshal", "shelve", "dill", "cloudpickle"}
    for path in Path(ROOT, "service").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned_calls, f"{path}: {node.func.id}()"
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned_modules, path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned_modules, path
    assert "allow_pickle" not in "".join(p.read_text() for p in Path(ROOT, "service").rglob("*.py"))


@pytest.mark.parametrize("path", ["/v1/activations/relu", "/v2/models/relu/infer"])
def test_blocked_executor_does_not_stop_health_endpoints(path):
    """Liveness and readiness answer from the event loop even while compute is stuck."""
    with serve() as srv:
        gate = block_executor(srv.engine)
        try:
            assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
            assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 200
        finally:
            gate.set()
