"""The shared engine process (``engine=process``): the whole IPC path on CPU. Requests go
from the server process through a shared-memory arena and a Unix socket to the engine
process and back; answers must be exactly what the inline engine gives."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.ipc import arena as arena_mod
from service.engine.ipc.remote import RemoteEngine

from .conftest import reference, serve
from .test_correctness import _send_all, check_concurrent, request_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proc_server():
    with serve(engine="process") as srv:
        yield srv


def _engine_pid(srv) -> int:
    engine = srv.engine
    assert isinstance(engine, RemoteEngine)
    return engine._process.pid


def _arena_path(srv) -> Path:
    return arena_mod.SHM_DIR / srv.engine._arena.name


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(request_spec(), min_size=1, max_size=8))
def test_answers_equal_the_lone_reference_bit_for_bit(proc_server, specs):
    check_concurrent(proc_server.url, specs)
    assert proc_server.engine.waiting == 0  # every slot given back


def test_json_v2_and_errors_through_the_engine(proc_server):
    with httpx.Client(base_url=proc_server.url, timeout=60) as c:
        r = c.post("/v1/activations/leaky_relu", json={"data": [-2, 0, 3],
                                                        "params": {"negative_slope": 0.5}})
        assert r.status_code == 200 and r.json()["data"] == [-1.0, 0.0, 3.0]
        r = c.post("/v2/models/relu/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2], "data": [-1.5, 2.5]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [0.0, 2.5]
        # validation happens in the server process, before anything reaches the engine
        r = c.post("/v1/activations/gelu", json={"data": [1.0], "inplace": True})
        assert r.status_code == 400 and "in-place" in r.json()["error"]["message"]
        assert c.get("/readyz").json()["devices"] == ["cpu"]
        # the capability table came from the engine's probe
        assert isinstance(c.get("/v1/activations").json()["unsupported"], list)


def test_large_binary_bodies_are_read_straight_into_the_arena(proc_server):
    """Native binary and v2 binary bodies of 64 KiB and more land in an arena slot as they
    arrive and go to the engine from there; the answers are exact either way."""
    import gzip

    eng = proc_server.engine
    x = np.linspace(-4, 4, 1 << 18, dtype=np.float32)
    want, _ = reference("gelu", x, "float32")
    binary = {"content-type": "application/octet-stream"}
    with httpx.Client(base_url=proc_server.url, timeout=60) as c:
        before = eng.bodies_in_place
        r = c.post("/v1/activations/gelu", params={"shape": str(x.size)}, content=x.tobytes(),
                   headers=binary)
        assert r.status_code == 200
        assert np.array_equal(np.frombuffer(r.content, np.float32), want)
        assert eng.bodies_in_place == before + 1
        # the v2 binary extension: the tensor after a JSON header of any length
        header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                           "shape": [x.size],
                                           "parameters": {"binary_data_size": x.nbytes}}],
                               "outputs": [{"name": "output",
                                            "parameters": {"binary_data": True}}]})
        r = c.post("/v2/models/gelu/infer", content=header + x.tobytes(),
                   headers={"inference-header-content-length": str(len(header))})
        assert r.status_code == 200
        at = int(r.headers["inference-header-content-length"])
        assert np.array_equal(np.frombuffer(r.content[at:], np.float32), want)
        assert eng.bodies_in_place == before + 2
        # input and upstream gradient in one body
        g = np.full(x.size, 0.5, dtype=np.float32)
        r = c.post("/v1/activations/tanh", params={"shape": str(x.size), "grad_output": "true",
                                                    "outputs": "value,grad"},
                   content=x.tobytes() + g.tobytes(), headers=binary)
        assert r.status_code == 200
        assert eng.bodies_in_place == before + 3
        value = np.frombuffer(r.content[:x.nbytes], np.float32)
        assert np.array_equal(value, reference("tanh", x, "float32")[0])
        # an encoded body, a small body and JSON are read as before, and are exact too
        r = c.post("/v1/activations/gelu", params={"shape": str(x.size)},
                   content=gzip.compress(x.tobytes()),
                   headers={**binary, "content-encoding": "gzip"})
        assert np.array_equal(np.frombuffer(r.content, np.float32), want)
        r = c.post("/v1/activations/gelu", params={"shape": "1000"}, content=x[:1000].tobytes(),
                   headers=binary)
        assert np.array_equal(np.frombuffer(r.content, np.float32), want[:1000])
        # a body that breaks its promise gives its slot back
        r = c.post("/v1/activations/gelu", params={"shape": "5"}, content=x.tobytes(),
                   headers=binary)
        assert r.status_code == 400
        assert eng.bodies_in_place == before + 3
    _wait(lambda: eng._arena.used == 0 and eng._lender.held == 0)


def _metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))


def test_an_answer_a_slow_client_has_not_read_is_never_overwritten():
    """An answer is sent from its arena slot. A client that reads slowly leaves part of it
    in the server's write buffer; the slot must not be reused (here by the next request's
    body and answer) until those bytes are in the kernel. Before the fix the slow client got
    the tail of the next request's answer."""
    import socket

    with serve(engine="process") as srv:
        n = 4 << 20  # 16 MiB each way: more than the kernel's socket buffers hold
        xa = np.linspace(-3, 3, n, dtype=np.float32)
        xb = np.linspace(5, 9, n, dtype=np.float32)
        count = 'actserve_requests_total{activation="relu",api="native"'
        before = _metric(srv.url, count)
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        slow.connect(("127.0.0.1", srv.port))
        head = (f"POST /v1/activations/relu?shape={n} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                f"content-type: application/octet-stream\r\ncontent-length: {xa.nbytes}"
                "\r\n\r\n").encode()
        slow.sendall(head + xa.tobytes())
        _wait(lambda: _metric(srv.url, count) > before)  # answered; not yet read
        r = httpx.post(srv.url + "/v1/activations/relu", params={"shape": str(n)},
                       content=xb.tobytes(), headers={"content-type": "application/octet-stream"},
                       timeout=60)
        assert r.status_code == 200
        assert np.array_equal(np.frombuffer(r.content, np.float32), xb)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += slow.recv(65536)
        headers, got = raw.split(b"\r\n\r\n", 1)
        assert headers.startswith(b"HTTP/1.1 200")
        while len(got) < xa.nbytes:
            got += slow.recv(1 << 20)
        slow.close()
        assert np.array_equal(np.frombuffer(got, np.float32), np.maximum(xa, 0))
        _wait(lambda: srv.engine._arena.used == 0)


def test_batches_form_in_the_engine():
    """With the engine holding batches open, concurrent requests share one batch there."""
    with serve(engine="process", max_delay_us=1_000_000, max_batch_requests=4) as srv:
        xs = [np.full(1000 + i, i, dtype=np.float32) for i in range(4)]
        requests = [dict(url="/v1/activations/relu", params={"shape": str(x.size)},
                         content=x.tobytes(),
                         headers={"content-type": "application/octet-stream"}) for x in xs]
        responses = asyncio.run(_send_all(srv.url, requests))
        assert all(r.status_code == 200 for r in responses)
        assert {r.headers["x-batch-size"] for r in responses} == {"4"}
        assert {r.headers["x-batch-elements"] for r in responses} == {str(sum(x.size for x in xs))}
        for x, r in zip(xs, responses, strict=True):
            assert np.array_equal(np.frombuffer(r.content, np.float32), x)
        # the batch is counted once in the v2 statistics
        stats = httpx.get(srv.url + "/v2/models/relu/stats").json()["model_stats"][0]
        assert stats["execution_count"] == 1 and stats["batch_stats"][0]["batch_size"] == 4


def test_deadline_queue_limit_and_compute_fault():
    with serve(engine="process", max_delay_us=300_000, fault_injection=True) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/activations/relu", json={"data": [1.0], "timeout": 0.05})
        assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
        r = c.post("/v1/activations/tanh", json={"data": [1.0]},
                   headers={"x-actserve-fault": "compute"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "compute_error"
        r = c.post("/v1/activations/tanh", json={"data": [0.0]})
        assert r.status_code == 200 and r.json()["data"] == [0.0]


def test_arena_too_small_for_a_request_is_413_and_a_full_arena_waits():
    with serve(engine="process", shm_arena_mib=1, max_delay_us=200_000) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        big = np.ones(200_000, dtype=np.float32)  # 800 kB in + 800 kB out > 1 MiB
        r = c.post("/v1/activations/relu", params={"shape": str(big.size)}, content=big.tobytes(),
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413 and "SHM_ARENA" in r.json()["error"]["message"]
        # three requests that fit one at a time: the later ones wait for room, then run
        xs = [np.full(100_000, i, dtype=np.float32) for i in range(3)]
        requests = [dict(url="/v1/activations/relu", params={"shape": str(x.size)},
                         content=x.tobytes(),
                         headers={"content-type": "application/octet-stream"}) for x in xs]
        responses = asyncio.run(_send_all(srv.url, requests))
        for x, resp in zip(xs, responses, strict=True):
            assert resp.status_code == 200
            assert np.array_equal(np.frombuffer(resp.content, np.float32), x)
        assert srv.engine._arena.used == 0


def test_engine_killed_answers_every_waiting_request_then_comes_back():
    with serve(engine="process") as srv:
        url = srv.url
        pid = _engine_pid(srv)
        os.kill(pid, signal.SIGSTOP)  # the engine computes nothing from here on
        results: list[int] = []
        done = threading.Event()

        def send(i: int) -> None:
            r = httpx.post(url + "/v1/activations/relu", json={"data": [float(i)]}, timeout=60)
            results.append(r.status_code)
            if len(results) == 3:
                done.set()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        _wait(lambda: srv.engine.waiting == 3)  # all three sent to the stopped engine
        os.kill(pid, signal.SIGKILL)
        assert done.wait(30), "a request hung after the engine died"
        for t in threads:
            t.join()
        assert results == [503, 503, 503]
        # readiness drops while the engine restarts (self-test included), then returns
        _wait(lambda: httpx.get(url + "/readyz").status_code == 200)
        r = httpx.post(url + "/v1/activations/relu", json={"data": [-1.0, 2.0]}, timeout=60)
        assert r.status_code == 200 and r.json()["data"] == [0.0, 2.0]
        assert srv.engine.restarts >= 1
        assert srv.engine._arena.used == 0


def test_shared_memory_is_cleaned_on_shutdown_and_stale_segments_on_start():
    stale = arena_mod.SHM_DIR / "actserve-999999999-0badcafe"  # no such process
    stale.write_bytes(b"\0" * 64)
    with serve(engine="process") as srv:
        assert not stale.exists()
        path = _arena_path(srv)
        assert path.exists()
        pid = _engine_pid(srv)
        r = httpx.post(srv.url + "/v1/activations/relu", json={"data": [1.0]}, timeout=60)
        assert r.status_code == 200
    assert not path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the engine process is gone too
