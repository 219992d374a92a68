"""KServe v2 over gRPC with the stock ``tritonclient.grpc`` client (sync, aio, streaming)
against a real server on 127.0.0.1: every result equals the reference bit for bit, errors
carry the gRPC status and the HTTP message, and gRPC requests are counted, authorised,
batched with HTTP requests and refused while draining."""

from __future__ import annotations

import asyncio
import base64
import queue
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tg_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import free_port, reference, same_bits, serve, subprocess_server
from .test_v2_api import held_executor, until
from .test_v2_tritonclient import sample, storage

RNG = np.random.default_rng(14)
CASES = [
    ("FP32", np.float32, "float32"),
    ("FP64", np.float64, "float64"),
    ("FP16", np.float16, "float16"),
    ("BF16", ml_dtypes.bfloat16, "bfloat16"),
]

pytestmark = pytest.mark.socket  # every test talks to grpc_server() (a real server)


def make_input(x: np.ndarray, datatype: str, module=tg):
    tensor = module.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def grpc_server(**overrides):
    port = free_port()
    return serve(grpc_port=port, **overrides), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gsrv():
    ctx, target = grpc_server()
    with ctx as srv:
        srv.target = target
        yield srv


@pytest.fixture()
def gc(gsrv):
    with tg.InferenceServerClient(gsrv.target) as c:
        yield c


def error_of(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def test_health_and_metadata(gc):
    assert gc.is_server_live() and gc.is_server_ready()
    meta = gc.get_server_metadata()
    assert meta.name == "actserve" and meta.version
    assert "system_shared_memory" in meta.extensions
    assert gc.is_model_ready("gelu") and gc.is_model_ready("gelu", model_version="1")
    assert not gc.is_model_ready("no_such_model")
    assert not gc.is_model_ready("gelu", model_version="7")
    model = gc.get_model_metadata("leaky_relu", as_json=True)
    assert model["name"] == "leaky_relu" and model["versions"] == ["1"]
    assert [t["name"] for t in model["inputs"]] == ["input"]
    assert [t["name"] for t in model["outputs"]] == ["output"]
    err = error_of(gc.get_model_metadata, "no_such_model")
    assert err.status() == "StatusCode.NOT_FOUND" and "no_such_model" in err.message()


@pytest.mark.parametrize(("datatype", "np_dtype", "wire"), CASES)
def test_raw_infer_all_datatypes_bit_exact(gc, datatype, np_dtype, wire):
    x = sample(np_dtype)
    result = gc.infer("gelu", [make_input(x, datatype)], request_id="g-1")
    out = result.as_numpy("output")
    expected, out_dtype = reference("gelu", storage(x, wire), wire)
    assert out_dtype == wire
    assert result.get_response().id == "g-1"
    assert result.get_output("output").datatype == datatype
    assert same_bits(storage(out, wire), expected)


def test_parameters_travel(gc):
    x = sample(np.float32)
    out = gc.infer("leaky_relu", [make_input(x, "FP32")],
                   parameters={"negative_slope": 0.2, "compute_dtype": "float64",
                               "inplace": True}, priority=3, timeout=5_000_000)
    expected, _ = reference("leaky_relu", x, "float32", params={"negative_slope": 0.2},
                            compute_dtype="float64", inplace=True)
    assert same_bits(out.as_numpy("output"), expected)
    amp = gc.infer("sigmoid", [make_input(x, "FP32")], parameters={"amp": True})
    expected, dtype = reference("sigmoid", x, "float32", amp=True)
    assert same_bits(storage(amp.as_numpy("output"), dtype), expected)


def stub(target: str):
    channel = grpc.insecure_channel(target)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_contents_trailing_metadata_and_contents_errors(gsrv):
    x = np.linspace(-2, 2, 9)
    channel, s = stub(gsrv.target)
    with channel:
        req = service_pb2.ModelInferRequest(model_name="relu")
        t = req.inputs.add(name="input", datatype="FP64", shape=[9])
        t.contents.fp64_contents.extend(x.tolist())
        resp, call = s.ModelInfer.with_call(req)
        out = np.frombuffer(resp.raw_output_contents[0], np.float64)
        assert same_bits(out, reference("relu", x, "float64")[0])
        trailer = dict(call.trailing_metadata())
        assert "total;dur=" in trailer["server-timing"] and trailer["x-batch-size"] == "1"
        req.inputs[0].datatype = "FP16"
        with pytest.raises(grpc.RpcError) as fp16:
            s.ModelInfer(req)
        assert fp16.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents" in fp16.value.details()
        req.inputs[0].datatype = "FP64"
        req.inputs[0].shape[:] = [10]
        with pytest.raises(grpc.RpcError) as short:
            s.ModelInfer(req)
        assert "needs 10" in short.value.details()
        req.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.RpcError) as both:
            s.ModelInfer(req)
        assert "set one of" in both.value.details()


def test_errors_map_to_status_codes_with_http_messages(gsrv, gc):
    x = sample(np.float32)
    err = error_of(gc.infer, "no_such_model", [make_input(x, "FP32")])
    assert err.status() == "StatusCode.NOT_FOUND"
    with httpx.Client(base_url=gsrv.url) as http:
        body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}
        http_msg = http.post("/v2/models/no_such_model/infer", json=body).json()["error"]
    assert err.message() == http_msg  # the same message as HTTP
    err = error_of(gc.infer, "relu", [make_input(x, "FP32")], model_version="2")
    assert err.status() == "StatusCode.NOT_FOUND" and "version" in err.message()
    bad = tg.InferInput("x", [3, 37], "FP32")
    bad.set_data_from_numpy(x)
    err = error_of(gc.infer, "relu", [bad])
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "'input'" in err.message()
    short = make_input(x, "FP32")
    short.set_shape([4, 37])
    err = error_of(gc.infer, "relu", [short])
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "needs 592" in err.message()
    err = error_of(gc.infer, "leaky_relu", [make_input(x, "FP32")],
                   parameters={"negative_slope": "steep"})
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "negative_slope" in err.message()
    err = error_of(gc.infer, "gelu", [make_input(x, "FP32")], parameters={"inplace": True})
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    two = [make_input(x, "FP32"), make_input(x, "FP32")]
    err = error_of(gc.infer, "relu", two)
    assert "two inputs must be 'input' and 'grad_output'" in err.message()
    assert gc.is_server_live()  # nothing above hurt the server


def test_message_over_max_request_bytes_is_resource_exhausted():
    ctx, target = grpc_server(max_request_bytes=64 * 1024)
    with ctx, tg.InferenceServerClient(target) as c:
        big = np.zeros(32 * 1024, np.float32)  # 128 KiB
        err = error_of(c.infer, "relu", [make_input(big, "FP32")])
        assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
        small = np.arange(-4, 4, dtype=np.float32)
        assert same_bits(c.infer("relu", [make_input(small, "FP32")]).as_numpy("output"),
                         np.maximum(small, 0))


def test_stream_answers_each_request_and_errors_in_band(gc):
    answers: queue.Queue = queue.Queue()
    gc.start_stream(callback=lambda result, error: answers.put((result, error)))
    xs = {f"s{i}": sample(np.float32, (5, 3 + i)) for i in range(6)}
    try:
        for rid, x in xs.items():
            gc.async_stream_infer("tanh", [make_input(x, "FP32")], request_id=rid)
        gc.async_stream_infer("tanh", [make_input(xs["s0"], "FP32")], request_id="bad",
                              parameters={"bogus": 1})
        got, errors = {}, []
        for _ in range(len(xs) + 1):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("output")
    finally:
        gc.stop_stream()
    assert set(got) == set(xs)
    for rid, x in xs.items():
        assert same_bits(got[rid], reference("tanh", x, "float32")[0])
    assert len(errors) == 1 and "bogus" in errors[0].message()


def test_aio_client_unary_and_stream(gsrv):
    x = sample(np.float32, (17,))
    xb = sample(ml_dtypes.bfloat16, (9,))

    async def scenario():
        async with tg_aio.InferenceServerClient(gsrv.target) as c:
            assert await c.is_server_live() and await c.is_server_ready()
            assert (await c.get_model_metadata("mish")).name == "mish"
            r = await c.infer("mish", [make_input(x, "FP32", tg_aio)])
            rb = await c.infer("relu", [make_input(xb, "BF16", tg_aio)])

            async def requests():
                for i in range(4):
                    yield {"model_name": "mish", "inputs": [make_input(x, "FP32", tg_aio)],
                           "request_id": str(i)}

            streamed = []
            async for result, error in c.stream_infer(requests()):
                assert error is None
                streamed.append(result.as_numpy("output"))
            return r.as_numpy("output"), rb.as_numpy("output"), streamed

    out, outb, streamed = asyncio.run(scenario())
    expected = reference("mish", x, "float32")[0]
    assert same_bits(out, expected)
    assert len(streamed) == 4 and all(same_bits(s, expected) for s in streamed)
    assert same_bits(storage(outb, "bfloat16"), reference("relu", storage(xb, "bfloat16"),
                                                          "bfloat16")[0])


def test_grpc_and_http_share_a_batch(gsrv):
    rt = gsrv.engine
    ex = rt.pool.executors[0]
    x = np.linspace(-3, 3, 11, dtype=np.float32)
    expected, _ = reference("leaky_relu", x, "float32", params={"negative_slope": 0.2})
    body = {"inputs": [{"name": "input", "shape": [11], "datatype": "FP32", "data": x.tolist()}],
            "parameters": {"negative_slope": 0.2}}
    channel, s = stub(gsrv.target)
    req = service_pb2.ModelInferRequest(model_name="leaky_relu")
    req.parameters["negative_slope"].double_param = 0.2
    req.inputs.add(name="input", datatype="FP32", shape=[11])
    req.raw_input_contents.append(x.tobytes())
    with channel, httpx.Client(base_url=gsrv.url, timeout=60) as http, \
            ThreadPoolExecutor(3) as pool, held_executor(rt) as (gate, batches):
        filler = pool.submit(http.post, "/v2/models/relu/infer", json=body | {"parameters": {}})
        until(lambda: ex.inflight_batches == 1)
        over_http = pool.submit(http.post, "/v2/models/leaky_relu/infer", json=body)
        over_grpc = pool.submit(s.ModelInfer.with_call, req)
        until(lambda: rt.batcher.waiting == 2)
        gate.set()
        filler.result(60)
        rh = over_http.result(60)
        resp, call = over_grpc.result(60)
    assert rh.status_code == 200 and rh.headers["x-batch-size"] == "2"
    assert dict(call.trailing_metadata())["x-batch-size"] == "2"
    assert sorted(batches[1]) == [("grpc", 0), ("v2", 0)]
    assert same_bits(np.asarray(rh.json()["outputs"][0]["data"], np.float32), expected)
    assert same_bits(np.frombuffer(resp.raw_output_contents[0], np.float32), expected)


def test_metrics_stats_and_statistics_count_grpc(gsrv, gc):
    before = gc.get_inference_statistics("softsign", as_json=True)["model_stats"][0]
    x = sample(np.float32)
    for _ in range(3):
        gc.infer("softsign", [make_input(x, "FP32")])
    error_of(gc.infer, "softsign", [make_input(x, "FP32")], parameters={"bogus": 1})
    after = gc.get_inference_statistics("softsign", "1", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    fail = after["inference_stats"]["fail"]
    assert int(fail["count"]) - int(before["inference_stats"]["fail"].get("count", 0)) == 1
    everything = gc.get_inference_statistics(as_json=True)["model_stats"]
    assert {"relu", "softsign"} <= {m["name"] for m in everything}
    metrics = httpx.get(gsrv.url + "/metrics").text
    line = [ln for ln in metrics.splitlines() if ln.startswith("actserve_requests_total{")
            and 'api="grpc"' in ln and 'activation="softsign"' in ln and "2xx" in ln]
    assert line and float(line[0].rsplit(" ", 1)[1]) >= 3
    stats = httpx.get(gsrv.url + "/v1/stats").json()
    assert stats["activations"]["softsign"]["requests"] >= 3


def test_bearer_token_in_metadata():
    ctx, target = grpc_server(api_keys="k1,k2")
    with ctx, tg.InferenceServerClient(target) as c:
        assert c.is_server_live() and c.is_server_ready()  # open, like /v2/health
        x = np.arange(-2, 2, dtype=np.float32)
        err = error_of(c.infer, "relu", [make_input(x, "FP32")])
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        err = error_of(c.infer, "relu", [make_input(x, "FP32")],
                       headers={"authorization": "Bearer nope"})
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        err = error_of(c.get_system_shared_memory_status)
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        ok = c.infer("relu", [make_input(x, "FP32")], headers={"authorization": "Bearer k2"})
        assert same_bits(ok.as_numpy("output"), np.maximum(x, 0))


def test_draining_is_unavailable_and_not_ready():
    ctx, target = grpc_server()
    with ctx as srv, tg.InferenceServerClient(target) as c:
        x = np.arange(-2, 2, dtype=np.float32)
        assert c.is_server_ready()
        srv.engine.begin_drain()
        assert c.is_server_live() and not c.is_server_ready()
        assert not c.is_model_ready("relu")
        err = error_of(c.infer, "relu", [make_input(x, "FP32")])
        assert err.status() == "StatusCode.UNAVAILABLE" and "shutting down" in err.message()


def test_deadline_in_queue_is_deadline_exceeded():
    ctx, target = grpc_server()
    with ctx as srv, tg.InferenceServerClient(target) as c, ThreadPoolExecutor(1) as pool, \
            held_executor(srv.engine):
        x = np.arange(-2, 2, dtype=np.float32)
        filler = pool.submit(c.infer, "relu", [make_input(x, "FP32")])
        until(lambda: srv.engine.pool.executors[0].inflight_batches == 1)  # behind the gate
        err = error_of(c.infer, "relu", [make_input(x, "FP32")], timeout=20_000)  # µs
        assert err.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in err.message()
    assert same_bits(filler.result(60).as_numpy("output"), np.maximum(x, 0))


def test_full_queue_is_unavailable():
    ctx, target = grpc_server(max_queue_requests=1, max_batch_requests=1)
    with ctx as srv, tg.InferenceServerClient(target) as c, \
            ThreadPoolExecutor(2) as pool, held_executor(srv.engine) as (gate, _):
        x = np.arange(-2, 2, dtype=np.float32)
        filler = pool.submit(c.infer, "relu", [make_input(x, "FP32")])
        until(lambda: srv.engine.pool.executors[0].inflight_batches == 1)  # behind the gate
        waiting = pool.submit(c.infer, "relu", [make_input(x, "FP32")])
        until(lambda: srv.engine.waiting == 1)
        err = error_of(c.infer, "relu", [make_input(x, "FP32")])
        assert err.status() == "StatusCode.UNAVAILABLE"
        gate.set()
        for f in (filler, waiting):
            assert same_bits(f.result(60).as_numpy("output"), np.maximum(x, 0))


def test_cuda_shared_memory_is_refused_clearly_on_cpu(gc, gsrv):
    err = error_of(gc.get_cuda_shared_memory_status)
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "no CUDA device" in err.message()
    err = error_of(gc.register_cuda_shared_memory, "c0", b"\0" * 64, 0, 1024)
    assert "no CUDA device" in err.message()
    r = httpx.get(gsrv.url + "/v2/cudasharedmemory/status")
    assert r.status_code == 400 and "no CUDA device" in r.json()["error"]


def test_grpc_port_zero_turns_grpc_off():
    with serve() as srv:  # the test default: grpc_port=0
        assert srv.services.settings.grpc_port == 0
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200


def test_sigterm_finishes_accepted_grpc_requests_and_exits_0():
    """gRPC requests held in the queue (max_delay_us) when SIGTERM arrives are all
    answered correctly (or refused UNAVAILABLE, never dropped) and the process exits 0."""
    port = free_port()
    env = {"ACTSERVE_GRPC_PORT": str(port), "ACTSERVE_MAX_DELAY_US": "400000",
           "ACTSERVE_MAX_BATCH_REQUESTS": "4"}
    xs = [RNG.standard_normal(500 + 50 * i).astype(np.float32) for i in range(12)]
    with subprocess_server(env) as (proc, url):
        async def run():
            async with tg_aio.InferenceServerClient(f"127.0.0.1:{port}") as c:
                tasks = [asyncio.ensure_future(c.infer("silu", [make_input(x, "FP32", tg_aio)]))
                         for x in xs]
                async with httpx.AsyncClient(base_url=url) as http:
                    deadline = asyncio.get_running_loop().time() + 30
                    while ((await http.get("/v1/stats")).json()["queue_depth"] < 4
                           and asyncio.get_running_loop().time() < deadline):
                        pass
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        assert proc.wait(60) == 0
    answered = 0
    for x, r in zip(xs, results, strict=True):
        if isinstance(r, InferenceServerException):
            assert r.status() == "StatusCode.UNAVAILABLE", r
            continue
        assert same_bits(r.as_numpy("output"), reference("silu", x, "float32")[0])
        answered += 1
    assert answered >= 4  # the queued ones were finished, not dropped


@pytest.mark.gpu
def test_cuda_shared_memory_on_a_cuda_server_refuses_a_bad_handle_by_name():
    ctx, target = grpc_server(device="cuda")
    with ctx, tg.InferenceServerClient(target) as c:
        # the client sends base64 (tritonclient decodes it): 64 zero bytes reach the server
        err = error_of(c.register_cuda_shared_memory, "c0", base64.b64encode(b"\0" * 64), 0,
                       1024)
        assert err.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'c0'" in err.message() and "cudaIpcOpenMemHandle" in err.message()
        assert c.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
        assert c.is_server_ready()
