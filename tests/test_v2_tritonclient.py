"""The acid test of the v2 API: the stock ``tritonclient.http`` client, sync and aio, against
a real server on 127.0.0.1. Every result equals the reference bit for bit."""

from __future__ import annotations

import asyncio
import time

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from .conftest import reference, same_bits

RNG = np.random.default_rng(20240611)
CASES = [  # v2 datatype, numpy dtype the client uses, our wire name
    ("FP32", np.float32, "float32"),
    ("FP64", np.float64, "float64"),
    ("FP16", np.float16, "float16"),
    ("BF16", ml_dtypes.bfloat16, "bfloat16"),
]


def host(server) -> str:
    return server.url.removeprefix("http://")


def sample(np_dtype, shape=(3, 37)) -> np.ndarray:
    x = RNG.normal(0.0, 3.0, size=shape).astype(np.float32)
    x.flat[:4] = [0.0, -0.0, 1e-3, -50.0]
    return x.astype(np_dtype)


def storage(x: np.ndarray, wire: str) -> np.ndarray:
    """The client's numpy array as our wire storage (bfloat16 as uint16 bits)."""
    return x.view(np.uint16) if wire == "bfloat16" else x


def make_input(x: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


@pytest.fixture()
def tc(server):
    with triton.InferenceServerClient(host(server), network_timeout=60) as c:
        yield c


def test_health_and_server_metadata(tc):
    assert tc.is_server_live() is True
    assert tc.is_server_ready() is True
    meta = tc.get_server_metadata()
    assert meta["name"] == "actserve" and meta["version"]
    assert set(meta["extensions"]) == {"binary_tensor_data", "parameters", "statistics",
                                       "system_shared_memory"}


def test_model_metadata_and_readiness(tc):
    meta = tc.get_model_metadata("leaky_relu")
    assert meta["name"] == "leaky_relu" and meta["versions"] == ["1"]
    assert [t["name"] for t in meta["inputs"]] == ["input"]
    assert [t["name"] for t in meta["outputs"]] == ["output"]
    assert meta["inputs"][0]["shape"] == [-1]
    assert meta["inputs"][0]["parameters"]["datatypes"].split(",") == ["FP16", "BF16", "FP32", "FP64"]
    assert meta["parameters"]["negative_slope"] == 0.01
    assert tc.get_model_metadata("relu", model_version="1")["name"] == "relu"
    assert tc.is_model_ready("gelu") is True
    assert tc.is_model_ready("gelu", model_version="1") is True
    assert tc.is_model_ready("no_such_model") is False
    assert tc.is_model_ready("gelu", model_version="7") is False


@pytest.mark.parametrize(("datatype", "np_dtype", "wire"), CASES)
def test_binary_infer_all_datatypes_bit_exact(tc, datatype, np_dtype, wire):
    x = sample(np_dtype)
    result = tc.infer("gelu", [make_input(x, datatype)], request_id="req-1")
    out = result.as_numpy("output")
    expected, out_dtype = reference("gelu", storage(x, wire), wire)
    assert out_dtype == wire
    assert result.get_response()["id"] == "req-1"
    assert result.get_output("output")["datatype"] == datatype
    assert same_bits(storage(out, wire), expected)


@pytest.mark.parametrize(("datatype", "np_dtype", "wire"), CASES[:2])
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_json_and_binary_inputs_and_outputs(tc, datatype, np_dtype, wire, binary_in, binary_out):
    x = sample(np_dtype, (2, 3, 5))
    output = triton.InferRequestedOutput("output", binary_data=binary_out)
    result = tc.infer("elu", [make_input(x, datatype, binary_in)], outputs=[output],
                      parameters={"alpha": 0.5})
    entry = result.get_output("output")
    assert ("data" in entry) is (not binary_out)
    expected, _ = reference("elu", x, wire, params={"alpha": 0.5})
    assert same_bits(result.as_numpy("output"), expected)


def test_settings_travel_in_parameters(tc):
    x = sample(np.float32)
    result = tc.infer("silu", [make_input(x, "FP32")],
                      parameters={"compute_dtype": "float64", "inplace": True})
    out = result.as_numpy("output")
    assert out.dtype == np.float64
    expected, _ = reference("silu", x, "float32", compute_dtype="float64", inplace=True)
    assert same_bits(out, expected)
    amp = tc.infer("sigmoid", [make_input(x, "FP32")], parameters={"amp": True})
    expected, dtype = reference("sigmoid", x, "float32", amp=True)
    assert amp.get_output("output")["datatype"] == {"float32": "FP32", "bfloat16": "BF16"}[dtype]
    assert same_bits(storage(amp.as_numpy("output"), dtype), expected)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_and_response_compression(tc, algorithm):
    x = sample(np.float32, (64, 33))
    result = tc.infer("tanh", [make_input(x, "FP32")], request_compression_algorithm=algorithm,
                      response_compression_algorithm=algorithm)
    expected, _ = reference("tanh", x, "float32")
    assert same_bits(result.as_numpy("output"), expected)
    json_result = tc.infer("tanh", [make_input(x, "FP32", binary=False)],
                           outputs=[triton.InferRequestedOutput("output", binary_data=False)],
                           request_compression_algorithm=algorithm)
    assert same_bits(json_result.as_numpy("output"), expected)


def test_non_finite_values_over_json_and_binary(tc):
    x = np.array([np.nan, np.inf, -np.inf, 0.5], dtype=np.float32)
    expected, _ = reference("relu", x, "float32")
    for binary in (True, False):
        out = tc.infer("relu", [make_input(x, "FP32", binary)],
                       outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
        assert same_bits(out.as_numpy("output"), expected)


def test_inference_statistics_count_requests(server, tc):
    before = tc.get_inference_statistics("softsign")["model_stats"][0]
    x = sample(np.float32)
    for _ in range(3):
        tc.infer("softsign", [make_input(x, "FP32")])
    with pytest.raises(InferenceServerException):
        tc.infer("softsign", [make_input(x, "FP32")], parameters={"bogus": 1})
    after = tc.get_inference_statistics("softsign", model_version="1")["model_stats"][0]
    assert after["name"] == "softsign" and after["version"] == "1"
    stats, prev = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - prev["success"]["count"] == 3
    assert stats["fail"]["count"] - prev["fail"]["count"] == 1
    assert stats["queue"]["count"] - prev["queue"]["count"] == 3
    assert stats["compute_infer"]["ns"] > prev["compute_infer"]["ns"]
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    everything = tc.get_inference_statistics()["model_stats"]
    assert {"relu", "softsign", "gelu"} <= {m["name"] for m in everything}


def test_errors_raise_the_client_exception(tc):
    x = sample(np.float32)
    with pytest.raises(InferenceServerException) as unknown:
        tc.infer("no_such_model", [make_input(x, "FP32")])
    assert unknown.value.status() == "404"
    assert "no_such_model" in unknown.value.message()
    with pytest.raises(InferenceServerException) as wrong_name:
        bad = triton.InferInput("x", [3, 37], "FP32")
        bad.set_data_from_numpy(x)
        tc.infer("relu", [bad])
    assert wrong_name.value.status() == "400" and "'input'" in wrong_name.value.message()
    with pytest.raises(InferenceServerException) as short:
        bad = make_input(x, "FP32")
        bad.set_shape([4, 37])  # declares more elements than it carries
        tc.infer("relu", [bad])
    assert short.value.status() == "400" and "binary_data_size" in short.value.message()
    with pytest.raises(InferenceServerException) as fp16_json:
        tc.infer("relu", [make_input(x.astype(np.float16), "FP16", binary=False)])
    assert fp16_json.value.status() == "400" and "binary" in fp16_json.value.message()
    with pytest.raises(InferenceServerException) as param:
        tc.infer("leaky_relu", [make_input(x, "FP32")], parameters={"negative_slope": "steep"})
    assert param.value.status() == "400" and "negative_slope" in param.value.message()


def test_aio_client(server):
    x = sample(np.float32, (17,))
    xb = sample(ml_dtypes.bfloat16, (9,))

    async def scenario():
        client = triton_aio.InferenceServerClient(host(server))
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert (await client.get_server_metadata())["name"] == "actserve"
            assert (await client.get_model_metadata("mish"))["outputs"][0]["name"] == "output"
            assert await client.is_model_ready("mish")
            tensor = triton_aio.InferInput("input", [17], "FP32")
            tensor.set_data_from_numpy(x)
            binary = await client.infer("mish", [tensor], request_compression_algorithm="gzip",
                                        response_compression_algorithm="gzip")
            as_json = await client.infer(
                "mish", [make_input(x, "FP32", binary=False)],
                outputs=[triton_aio.InferRequestedOutput("output", binary_data=False)])
            bf16 = await client.infer("hardswish", [make_input(xb, "BF16")])
            stats = await client.get_inference_statistics("mish")
            with pytest.raises(InferenceServerException) as unknown:
                await client.infer("nope", [tensor])
            return binary, as_json, bf16, stats, unknown.value
        finally:
            await client.close()

    binary, as_json, bf16, stats, unknown = asyncio.run(scenario())
    expected, _ = reference("mish", x, "float32")
    assert same_bits(binary.as_numpy("output"), expected)
    assert same_bits(as_json.as_numpy("output"), expected)
    expected_bf16, _ = reference("hardswish", xb.view(np.uint16), "bfloat16")
    assert same_bits(bf16.as_numpy("output").view(np.uint16), expected_bf16)
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 2
    assert unknown.status() == "404"


def test_client_priority_and_timeout_reach_the_batcher(server, tc):
    seen: list[tuple[int, float]] = []
    observer = server.engine.batcher.on_batch

    def spy(jobs, results, wall):
        seen.extend((j.priority, j.deadline) for j in jobs)
        observer(jobs, results, wall)

    server.engine.batcher.on_batch = spy
    try:
        # the client's timeout is in microseconds: 5 s here, far below the 30 s default
        tc.infer("relu", [make_input(sample(np.float32), "FP32")], priority=3, timeout=5_000_000)
    finally:
        server.engine.batcher.on_batch = observer
    [(priority, deadline)] = seen
    assert priority == 3
    remaining = deadline - time.monotonic()
    assert 0 < remaining <= 5.0
