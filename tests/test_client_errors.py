"""The Python client's errors, retries, timeouts and connection handling.

Two kinds of server: the real one (``serve``) for each row of the error table, and a tiny
scripted HTTP/1.1 server that answers from a list (503, 503, 200 ...), records when each
request came, and counts the connections it saw opened and closed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import actserve_client as ac
import numpy as np
import pytest
from actserve_client import AsyncClient, Client, RetryPolicy

from loadtest.servers import free_port

from .conftest import serve
from .gates import held, submissions, wait_for

FAST = RetryPolicy(max_retries=2, initial_backoff=0.001, max_backoff=0.002)
X = np.array([-1.0, 1.0], dtype=np.float32)


def ok_v2(values=(0.0, 1.0)) -> tuple[int, dict, bytes]:
    """A 200 v2 JSON answer for a 2-element float32 input."""
    body = {"model_name": "relu", "outputs": [
        {"name": "output", "datatype": "FP32", "shape": [len(values)], "data": list(values)}]}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def err(status: int, message: str = "nope", headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, \
        json.dumps({"error": message}).encode()


DROP = "drop"  # close the connection without answering


class Scripted:
    """An HTTP/1.1 keep-alive server on 127.0.0.1 that answers from a script."""

    def __init__(self, script) -> None:
        self.script = deque(script)
        self.requests: list[tuple[float, str, dict, bytes]] = []
        self.opened = 0
        self.open = 0
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with owner.cond:
                    owner.opened += 1
                    owner.open += 1
                    owner.cond.notify_all()

            def finish(self):
                try:
                    super().finish()
                finally:
                    with owner.cond:
                        owner.open -= 1
                        owner.cond.notify_all()

            def _answer(self):
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else b""
                with owner.cond:
                    owner.requests.append((time.monotonic(), self.path, dict(self.headers), body))
                    item = owner.script.popleft() if owner.script else err(500, "script exhausted")
                if item == DROP:
                    self.close_connection = True
                    return
                if isinstance(item, threading.Event):  # hold until released, then answer
                    item.wait(30)
                    item = ok_v2()
                status, headers, payload = item
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    self.close_connection = True

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def wait_all_closed(self, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.open == 0, timeout)

    @property
    def count(self) -> int:
        return len(self.requests)


# -- retries -------------------------------------------------------------------------------
def test_503_twice_then_200_succeeds_after_two_retries():
    with Scripted([err(503), err(503), ok_v2()]) as srv, \
            Client(srv.url, retry_policy=FAST) as c:
        assert c.activate("relu", X).tolist() == [0.0, 1.0]
        assert srv.count == 3
        ids = {r[2]["X-Request-Id"] for r in srv.requests}
        assert len(ids) == 1  # one logical request, retried under the same id


def test_retries_are_bounded_by_max_retries():
    with Scripted([err(503)] * 5) as srv, Client(srv.url, retry_policy=FAST) as c:
        with pytest.raises(ac.OverloadedError):
            c.activate("relu", X)
        assert srv.count == 3  # one try + max_retries=2
    with Scripted([err(504), ok_v2()]) as srv, Client(srv.url, max_retries=0) as c:
        with pytest.raises(ac.DeadlineExceededError):
            c.activate("relu", X)
        assert srv.count == 1


@pytest.mark.parametrize("status", [400, 401, 404, 408, 413, 415, 422, 500])
def test_4xx_and_500_are_never_retried(status):
    with Scripted([err(status), ok_v2()]) as srv, Client(srv.url, retry_policy=FAST) as c:
        with pytest.raises(ac.APIStatusError) as info:
            c.activate("relu", X)
        assert info.value.status == status and srv.count == 1


def test_504_and_dropped_connections_are_retried():
    with Scripted([err(504), DROP, ok_v2()]) as srv, Client(srv.url, retry_policy=FAST) as c:
        assert c.activate("relu", X).tolist() == [0.0, 1.0]
        assert srv.count == 3


def test_retry_after_is_honoured():
    with Scripted([err(503, headers={"Retry-After": "1"}), ok_v2()]) as srv, \
            Client(srv.url, retry_policy=FAST) as c:
        c.activate("relu", X)
        assert srv.count == 2
        gap = srv.requests[1][0] - srv.requests[0][0]
        assert gap >= 1.0  # the backoff alone would have been ~1 ms


def test_retry_after_beyond_the_cap_is_not_retried():
    with Scripted([err(503, headers={"Retry-After": "3600"}), ok_v2()]) as srv, \
            Client(srv.url, retry_policy=FAST) as c:
        with pytest.raises(ac.OverloadedError) as info:
            c.activate("relu", X)
        assert info.value.retry_after == 3600 and srv.count == 1


def test_async_client_retries_the_same_way():
    async def run(url):
        async with AsyncClient(url, retry_policy=FAST) as c:
            return await c.activate("relu", [-1.0, 1.0])

    with Scripted([err(503), DROP, ok_v2()]) as srv:
        assert asyncio.run(run(srv.url)) == [0.0, 1.0]
        assert srv.count == 3
    with Scripted([err(400, "bad"), ok_v2()]) as srv:
        with pytest.raises(ac.BadRequestError, match="bad"):
            asyncio.run(run(srv.url))
        assert srv.count == 1


# -- connections ---------------------------------------------------------------------------
def test_no_leaked_connections_after_errors_sync():
    script = [err(503)] * 3 + [err(400)] * 3 + [err(404), err(500)] + \
             [(200, {"Content-Type": "application/json"}, b"{not json")] + [ok_v2()]
    with Scripted(script) as srv:
        c = Client(srv.url, retry_policy=FAST)
        for expected in (ac.OverloadedError, ac.BadRequestError, ac.BadRequestError,
                         ac.BadRequestError, ac.NotFoundError, ac.ServerError,
                         ac.MalformedResponseError):
            with pytest.raises(expected):
                c.activate("relu", X)
        assert c.activate("relu", X).tolist() == [0.0, 1.0]
        assert srv.count == 10
        assert srv.opened == 1  # every error left the connection reusable
        c.close()
        assert srv.wait_all_closed()
        assert c.is_closed


def test_no_leaked_connections_after_errors_async():
    async def run(url):
        async with AsyncClient(url, retry_policy=FAST) as c:
            for _ in range(3):
                with pytest.raises(ac.APIStatusError):
                    await c.activate("relu", X)
            return await c.activate("relu", X)

    with Scripted([err(503)] * 3 + [err(400), err(500), ok_v2()]) as srv:
        assert asyncio.run(run(srv.url)).tolist() == [0.0, 1.0]
        assert srv.count == 6 and srv.opened == 1
        assert srv.wait_all_closed()


def test_connection_refused_is_a_connection_error_after_retries():
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retry_policy=FAST) as c:
        with pytest.raises(ac.APIConnectionError) as info:
            c.activate("relu", X)
        assert not isinstance(info.value, ac.APITimeoutError)
        assert info.value.status is None and info.value.request_id
        assert isinstance(info.value.__cause__, Exception)  # the httpx error, chained
        assert c.health() is False and c.ready() is False  # probes never raise


def test_read_timeout_is_a_timeout_error_and_not_retried():
    release = threading.Event()
    with Scripted([release, ok_v2()]) as srv, Client(srv.url, timeout=0.2, retry_policy=FAST) as c:
        t0 = time.monotonic()
        with pytest.raises(ac.APITimeoutError) as info:
            c.activate("relu", X)
        assert info.value.phase == "read"
        assert time.monotonic() - t0 < 5
        release.set()
        assert srv.count == 1


def test_per_call_timeout_reaches_the_server_as_its_deadline():
    native = (200, {"Content-Type": "application/json"},
              b'{"activation":"relu","shape":[2],"dtype":"float32","data":[0.0,1.0]}')
    with Scripted([ok_v2(), native]) as srv, Client(srv.url) as c:
        c.activate("relu", X, timeout=2.5)
        c.activate("relu", X, timeout=0.25, protocol="native")
        header_len = int(srv.requests[0][2]["Inference-Header-Content-Length"])
        v2_header = json.loads(srv.requests[0][3][:header_len])
        assert v2_header["parameters"]["timeout"] == 2_500_000  # microseconds
        assert "timeout=0.25" in srv.requests[1][1]  # native: seconds


def test_wait_until_ready_times_out_with_a_timeout_error():
    port = free_port()
    with Client(f"http://127.0.0.1:{port}") as c, pytest.raises(ac.APITimeoutError, match="not ready"):
        c.wait_until_ready(0.3, interval=0.05)


# -- the real server's answers, one per row of its error table ------------------------------
def test_400_404_and_415_from_the_server(server):
    with Client(server.url, max_retries=0) as c:
        with pytest.raises(ac.BadRequestError) as info:
            c.activate("leaky_relu", X, negative_slope="steep")
        assert info.value.status == 400 and "negative_slope" in info.value.message
        assert info.value.request_id and len(info.value.request_id) == 32
        with pytest.raises(ac.BadRequestError, match="beta"):
            c.activate("softplus", X, beta=-1.0, protocol="native")
        with pytest.raises(ac.NotFoundError) as info:
            c.activate("no_such_activation", X)
        assert info.value.status == 404
        with pytest.raises(ac.NotFoundError):
            c.activate("no_such_activation", X, protocol="native-json")
    with Client(server.url, headers={"Content-Encoding": "br"}, max_retries=0) as c:
        with pytest.raises(ac.UnsupportedMediaTypeError) as info:
            c.activate("relu", X)
        assert info.value.status == 415 and "br" in info.value.message


def test_native_error_type_is_kept(server):
    with Client(server.url, protocol="native-json") as c:
        with pytest.raises(ac.BadRequestError) as info:
            c.activate("relu", X, inplace=True, alpha=1.0)
        assert info.value.error_type == "invalid_request"


def test_401_without_the_api_key():
    with serve(api_keys="s3cret") as srv:
        with Client(srv.url, max_retries=0) as c:
            with pytest.raises(ac.AuthenticationError) as info:
                c.activate("relu", X)
            assert info.value.status == 401
            assert c.health() and c.ready()  # probes stay open
        with Client(srv.url, api_key="s3cret") as c:
            assert c.activate("relu", X).tolist() == [0.0, 1.0]
            assert "relu" in c.activations()


def test_413_too_large():
    with serve(max_request_bytes=4096, max_batch_elements=2000, max_batch_requests=8,
               max_queue_requests=64) as srv, Client(srv.url, max_retries=0) as c:
        with pytest.raises(ac.RequestTooLargeError) as info:
            c.activate("relu", np.zeros(3000, dtype=np.float64))  # 24 kB body
        assert info.value.status == 413
        with pytest.raises(ac.RequestTooLargeError, match="max_batch_elements"):
            # a small body (4002 bytes) with too many elements
            c.activate("relu", np.zeros(2001, dtype=np.float16), protocol="native")
        assert c.activate("relu", np.ones(16, dtype=np.float32)).sum() == 16  # still usable


def test_500_compute_failure():
    with serve(fault_injection=True) as srv:
        counter = submissions(srv.engine)
        with Client(srv.url, headers={"x-actserve-fault": "compute"}, retry_policy=FAST) as c:
            with pytest.raises(ac.ServerError) as info:
                c.activate("tanh", X)
            assert info.value.status == 500 and "compute" in info.value.message
        assert counter.count == 1  # not retried


def test_503_draining_and_readiness():
    with serve() as srv, Client(srv.url, max_retries=0) as c:
        c.wait_until_ready(30)
        assert c.ready() and c.health()
        srv.loop.call_soon_threadsafe(srv.engine.begin_drain)
        deadline = time.monotonic() + 10
        while c.ready():
            assert time.monotonic() < deadline
        assert c.health()  # live, but not ready
        with pytest.raises(ac.OverloadedError) as info:
            c.activate("relu", X)
        assert info.value.status == 503 and info.value.retry_after == 1.0
        with pytest.raises(ac.OverloadedError):
            c.activate("relu", X, protocol="native")
        with pytest.raises(ac.APITimeoutError):
            c.wait_until_ready(0.2, interval=0.05)


def test_504_deadline_exceeded_from_the_server():
    with serve() as srv:
        rt = srv.engine

        async def run():
            async with AsyncClient(srv.url, max_retries=0) as c:
                async with held(rt, 2):
                    filler = asyncio.ensure_future(c.activate("relu", [1.0]))
                    await wait_for(lambda: submissions(rt).count >= 1 and not rt.batcher.waiting)
                    with pytest.raises(ac.DeadlineExceededError) as info:
                        # expires in the queue while the compute thread is held
                        await c.activate("softsign", X, timeout=0.05)
                assert await filler == [1.0]
                return info.value

        error = asyncio.run(run())
        assert error.status == 504 and "deadline" in error.message


def test_local_validation_happens_before_sending():
    with Scripted([]) as srv, Client(srv.url) as c:
        with pytest.raises(ac.InvalidInputError, match="int64"):
            c.activate("relu", np.arange(4))
        with pytest.raises(ac.InvalidInputError, match=r"ragged|rectangular"):
            c.activate("relu", [[1.0, 2.0], [3.0]])
        with pytest.raises(ac.InvalidInputError, match="numbers"):
            c.activate("relu", [1.0, None])
        with pytest.raises(ValueError):  # InvalidInputError is a ValueError too
            c.activate("relu", X, compute_dtype="int8")
        with pytest.raises(ac.InvalidInputError, match="binary"):
            c.activate("relu", X.astype(np.float16), protocol="v2-json")
        with pytest.raises(ac.InvalidInputError, match="protocol"):
            c.activate("relu", X, protocol="grpc")
        with pytest.raises(ac.InvalidInputError, match="timeout"):
            c.activate("relu", X, timeout=0)
        with pytest.raises(ac.InvalidInputError, match="reserved"):
            c.activate("relu", X, shape=3)
        assert srv.count == 0


def test_client_arguments_are_checked():
    with pytest.raises(ValueError, match="base_url"):
        Client("127.0.0.1:8000")
    with pytest.raises(ValueError, match="timeout"):
        Client("http://127.0.0.1:1", timeout=-1)
    with pytest.raises(ValueError, match="max_retries"):
        Client("http://127.0.0.1:1", max_retries=-1)
    with pytest.raises(ValueError, match="protocol"):
        Client("http://127.0.0.1:1", protocol="xml")

