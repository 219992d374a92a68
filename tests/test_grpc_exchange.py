"""gRPC on the one request sequence (``service.exchange``): its requests are in the access log
with the transport named, their messages are charged to the same byte budget as HTTP bodies,
the same bearer check refuses them, one table maps errors to both wires, a malformed message
is INVALID_ARGUMENT, and RPCs and stream backlogs are bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from service import errors
from service.exchange import auth
from service.grpc import service as grpc_service
from service.grpc.inference import Inference
from service.http import middleware

from .conftest import free_port, serve
from .test_v2_api import held_executor, until

X = np.array([-1.5, 0.0, 2.0], np.float32)


def _infer(client, name: str = "relu", x: np.ndarray = X, **kw):
    tensor = tg.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor], **kw)


def _access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "actserve.access"]


def test_grpc_requests_are_in_the_access_log_with_the_transport_named(caplog):
    caplog.set_level(logging.INFO, logger="actserve.access")
    port = free_port()
    with serve(grpc_port=port, access_log=True) as srv:
        with tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
            assert _infer(c).as_numpy("output").tolist() == [0.0, 0.0, 2.0]
            with pytest.raises(InferenceServerException):
                _infer(c, "nope")
        srv.app.state.access_log.close()  # every queued line written
    lines = [line for line in _access_lines(caplog) if line.get("transport") == "grpc"]
    ok = [line for line in lines if line["status"] == 200]
    assert ok and ok[0]["method"] == "ModelInfer" and ok[0]["activation"] == "relu"
    assert ok[0]["path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert ok[0]["api"] == "grpc" and ok[0]["shape"] == [3] and "compute_ms" in ok[0]
    assert ok[0]["client"] and ok[0]["id"]
    refused = [line for line in lines if line["status"] == 404]
    assert refused and refused[0]["error"] == "not_found"


def test_a_grpc_message_waits_for_the_byte_budget_and_is_refused_like_an_http_body():
    """With the budget held, a gRPC message larger than what is free waits its turn and is
    refused (UNAVAILABLE, as HTTP's 503) at the body deadline; once the budget is free it
    is served."""
    port = free_port()
    budget = 256 * 1024
    with serve(grpc_port=port, max_body_bytes_in_flight=budget, body_timeout_s=1.0) as srv, \
            tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
        big = np.linspace(-1, 1, 128 * 1024, dtype=np.float32)  # 512 KiB > the free budget
        held = asyncio.run_coroutine_threadsafe(srv.services.bodies.acquire(budget, 5),
                                                srv.loop).result(10)
        try:
            with pytest.raises(InferenceServerException) as info:
                _infer(c, x=big)
            assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
            assert srv.services.bodies.waiting == 0
        finally:
            srv.loop.call_soon_threadsafe(srv.services.bodies.release, held)
        out = _infer(c, x=big).as_numpy("output")
        assert np.array_equal(out, np.maximum(big, 0))
        assert srv.services.bodies.held == 0  # the grant went back


def test_the_same_bearer_check_refuses_grpc_and_http():
    assert grpc_service.authorised is auth.authorised is middleware.authorised
    keys = [b"k1", b"k2"]
    assert auth.authorised(b"Bearer k2", keys) and auth.authorised(b"bearer  k1 ", keys)
    assert not auth.authorised(b"Basic k1", keys) and not auth.authorised(None, keys)
    assert not auth.authorised(b"Bearer k3", keys) and auth.authorised(None, [])
    port = free_port()
    with serve(grpc_port=port, api_keys="k1") as _, \
            tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic k1"}):
            with pytest.raises(InferenceServerException) as info:
                _infer(c, headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", headers
        assert _infer(c, headers={"authorization": "Bearer k1"}).as_numpy("output") is not None


def test_one_table_maps_every_error_to_its_http_status_and_grpc_code():
    for cls, (status, code) in errors.WIRE_TABLE.items():
        exc = cls("x")
        assert exc.status == status == errors.STATUS_TABLE[cls]
        assert grpc_service.code_of(exc) == grpc.StatusCode[code], cls

    class Teapot(errors.ActserveError):
        status = 429

    assert grpc_service.code_of(Teapot("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_service.code_of(errors.ActserveError("x")) == grpc.StatusCode.INTERNAL


def test_a_malformed_message_is_invalid_argument_and_counted():
    port = free_port()
    with serve(grpc_port=port) as srv, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ModelInferRequest" in info.value.details()
        metrics = srv.services.recorder.metrics.exposition().decode()
        assert 'actserve_rejections_total{reason="invalid"} 1.0' in metrics


def test_rpcs_beyond_the_concurrent_limit_are_refused_at_once():
    port = free_port()
    with serve(grpc_port=port, grpc_max_concurrent_rpcs=1) as srv, \
            tg.InferenceServerClient(f"127.0.0.1:{port}") as c, ThreadPoolExecutor(1) as pool, \
            held_executor(srv.engine) as (gate, _):
        first = pool.submit(_infer, c)
        until(lambda: srv.services.recorder.inflight == 1)  # held at the compute thread
        with tg.InferenceServerClient(f"127.0.0.1:{port}") as other, \
                pytest.raises(InferenceServerException) as info:
            _infer(other)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        gate.set()
        assert first.result(30).as_numpy("output").tolist() == [0.0, 0.0, 2.0]


def test_a_stream_whose_answers_are_not_taken_is_read_no_further():
    """At most ``grpc_stream_inflight`` requests of a stream are in flight: after k answers
    are taken, no more than limit + k requests have been started, whatever the scheduling."""
    limit, total = 4, 50

    class Svc:
        class settings:  # noqa: N801 - a stand-in for Settings
            grpc_stream_inflight = limit

    inference = Inference.__new__(Inference)
    inference.svc = Svc
    started: list[bytes] = []

    async def run(raw, peer=None, rpc="", regions=None, **_):
        started.append(raw)
        await asyncio.sleep(0)
        return errors.InvalidRequest(f"answer {raw!r}"), ()

    inference.run = run

    async def requests():
        for i in range(total):
            yield str(i).encode()

    async def consume():
        taken = 0
        async for item in inference.stream(requests()):
            assert item.error_message.startswith("answer")
            assert len(started) <= limit + taken, (len(started), taken)
            taken += 1
            for _ in range(5):  # let the reader run as far as it may
                await asyncio.sleep(0)
            assert len(started) <= limit + taken, (len(started), taken)
        return taken

    assert asyncio.run(consume()) == total


def test_a_grpc_deadline_is_the_jobs_deadline_and_a_given_up_job_is_never_computed():
    port = free_port()
    with serve(grpc_port=port) as srv, tg.InferenceServerClient(f"127.0.0.1:{port}") as c, \
            held_executor(srv.engine) as (gate, batches):
        with pytest.raises(InferenceServerException) as info:
            _infer(c, client_timeout=0.5)  # the compute thread is held past it
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        until(lambda: srv.engine.waiting == 0)  # dropped by the server, not computed
        gate.set()
    assert not any(api == "grpc" for batch in batches for api, _ in batch), batches
