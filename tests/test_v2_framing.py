"""Byte-level tests of the binary tensor extension's framing, written by hand (no client
library): a JSON header of ``Inference-Header-Content-Length`` bytes, then each binary
input's raw little-endian bytes in order, no padding, used up exactly."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from .conftest import reference, same_bits

URL = "/v2/models/relu/infer"


def framed(header: dict, *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def binary_input(x: np.ndarray, datatype: str = "FP32", name: str = "input",
                 size: int | None = None) -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype,
            "parameters": {"binary_data_size": x.nbytes if size is None else size}}


def split_response(r) -> tuple[dict, bytes]:
    length = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:length]), r.content[length:]


def error_of(r, status: int = 400) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


X = np.array([-1.5, 0.0, 2.25, -0.0, 3.0], dtype="<f4")


def test_binary_round_trip_with_binary_output(app_client):
    body, headers = framed({"id": "a1", "inputs": [binary_input(X)],
                            "parameters": {"binary_data_output": True}}, X.tobytes())
    r = app_client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header, raw = split_response(r)
    assert header["id"] == "a1" and header["model_name"] == "relu"
    out = header["outputs"][0]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [5]
    assert out["parameters"]["binary_data_size"] == len(raw) == X.nbytes
    expected, _ = reference("relu", X, "float32")
    assert same_bits(np.frombuffer(raw, dtype="<f4"), expected)


def test_binary_input_json_output_by_default(app_client):
    body, headers = framed({"inputs": [binary_input(X)]}, X.tobytes())
    r = app_client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    payload = r.json()
    assert "id" not in payload
    assert payload["outputs"][0]["data"] == [0.0, 0.0, 2.25, 0.0, 3.0]


def test_output_parameter_overrides_request_default(app_client):
    body, headers = framed({"inputs": [binary_input(X)], "parameters": {"binary_data_output": True},
                            "outputs": [{"name": "output", "parameters": {"binary_data": False}}]},
                           X.tobytes())
    r = app_client.post(URL, content=body, headers=headers)
    assert r.status_code == 200 and "data" in r.json()["outputs"][0]


def test_short_body_names_the_input(app_client):
    body, headers = framed({"inputs": [binary_input(X)]}, X.tobytes()[:-3])
    message = error_of(app_client.post(URL, content=body, headers=headers))
    assert "'input'" in message and "binary_data_size is 20 bytes" in message
    assert "only 17 bytes" in message


def test_extra_bytes_name_the_input(app_client):
    body, headers = framed({"inputs": [binary_input(X)]}, X.tobytes() + b"\x00\x01")
    message = error_of(app_client.post(URL, content=body, headers=headers))
    assert "2 unexpected bytes" in message and "'input'" in message


def test_binary_data_size_must_match_shape(app_client):
    body, headers = framed({"inputs": [binary_input(X, size=16)]}, X.tobytes()[:16])
    message = error_of(app_client.post(URL, content=body, headers=headers))
    assert "binary_data_size is 16 bytes" in message and "needs 20" in message


def test_header_length_beyond_body(app_client):
    body, _ = framed({"inputs": [binary_input(X)]}, X.tobytes())
    r = app_client.post(URL, content=body,
                    headers={"Inference-Header-Content-Length": str(len(body) + 1)})
    assert "beyond the body" in error_of(r)


@pytest.mark.parametrize(("value", "word"), [("-4", "negative"), ("abc", "not a number"),
                                             ("12.5", "not a number"), ("", "not a number")])
def test_bad_header_values(app_client, value, word):
    body, _ = framed({"inputs": [binary_input(X)]}, X.tobytes())
    r = app_client.post(URL, content=body, headers={"Inference-Header-Content-Length": value})
    message = error_of(r)
    assert "Inference-Header-Content-Length" in message and word in message


def test_header_length_cutting_the_json(app_client):
    body, headers = framed({"inputs": [binary_input(X)]}, X.tobytes())
    cut = str(int(headers["Inference-Header-Content-Length"]) - 2)
    r = app_client.post(URL, content=body, headers={"Inference-Header-Content-Length": cut})
    assert "JSON" in error_of(r)


def test_binary_input_without_the_header(app_client):
    body, _ = framed({"inputs": [binary_input(X)]}, X.tobytes())
    message = error_of(app_client.post(URL, content=body))
    # without the header the whole body is taken for JSON, and it is not JSON
    assert "JSON" in message
    body = json.dumps({"inputs": [binary_input(X)]}).encode()
    message = error_of(app_client.post(URL, content=body))
    assert "Inference-Header-Content-Length" in message and "'input'" in message


def test_two_inputs_are_framed_then_refused(app_client):
    y = np.arange(3, dtype="<f8")
    two = [binary_input(X), binary_input(y, "FP64", name="second")]
    # framing is checked for every input first: the second input is short
    body, headers = framed({"inputs": two}, X.tobytes(), y.tobytes()[:-1])
    message = error_of(app_client.post(URL, content=body, headers=headers))
    assert "'second'" in message and "only 23 bytes" in message
    # exact framing: then the second input's name is what is wrong (the model takes
    # 'input' and, for a gradient, 'grad_output')
    body, headers = framed({"inputs": two}, X.tobytes(), y.tobytes())
    message = error_of(app_client.post(URL, content=body, headers=headers))
    assert "'grad_output'" in message and "'second'" in message


def test_zero_element_tensor(app_client):
    empty = np.zeros((0, 3), dtype="<f4")
    body, headers = framed({"inputs": [binary_input(empty)],
                            "parameters": {"binary_data_output": True}})
    r = app_client.post(URL, content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, raw = split_response(r)
    assert header["outputs"][0]["shape"] == [0, 3] and raw == b""
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 0
    # zero bytes need no header at all; JSON output is an empty list
    r = app_client.post(URL, json={"inputs": [binary_input(empty)]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0] == {"name": "output", "datatype": "FP32", "shape": [0, 3],
                                      "data": []}


def test_non_finite_values_binary_and_json_tokens(app_client):
    x = np.array([np.nan, np.inf, -np.inf, -2.0, 1.0], dtype="<f4")
    expected, _ = reference("relu", x, "float32")
    body, headers = framed({"inputs": [binary_input(x)],
                            "parameters": {"binary_data_output": True}}, x.tobytes())
    _, raw = split_response(app_client.post(URL, content=body, headers=headers))
    assert same_bits(np.frombuffer(raw, dtype="<f4"), expected)
    text = b'{"inputs": [{"name": "input", "shape": [5], "datatype": "FP32", ' \
           b'"data": [NaN, Infinity, -Infinity, -2.0, 1.0]}]}'
    r = app_client.post(URL, content=text)
    assert r.status_code == 200, r.text
    assert b"NaN" in r.content and b"Infinity" in r.content
    data = json.loads(r.content)["outputs"][0]["data"]
    assert same_bits(np.asarray(data, dtype="<f4"), expected)


@pytest.mark.parametrize("wire", ["FP16", "BF16"])
def test_sixteen_bit_binary_and_refused_over_json(app_client, wire):
    x32 = np.array([-1.0, 0.5, 3.0, -0.25], dtype="<f4")
    if wire == "FP16":
        raw = x32.astype("<f2").tobytes()
        storage = np.frombuffer(raw, dtype="<f2")
    else:  # BF16: the upper 16 bits of each little-endian float32
        storage = (x32.view("<u4") >> 16).astype("<u2")
        raw = storage.tobytes()
    body, headers = framed({"inputs": [binary_input(storage, wire)],
                            "parameters": {"binary_data_output": True}}, raw)
    r = app_client.post("/v2/models/sigmoid/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, out = split_response(r)
    assert header["outputs"][0]["datatype"] == wire
    name = {"FP16": "float16", "BF16": "bfloat16"}[wire]
    expected, _ = reference("sigmoid", storage.copy(), name)
    assert out == expected.tobytes()
    as_json = {"inputs": [{"name": "input", "shape": [4], "datatype": wire, "data": [1, 2, 3, 4]}]}
    message = error_of(app_client.post("/v2/models/sigmoid/infer", json=as_json))
    assert wire in message and "binary" in message
    # binary input, but asking for a JSON output of a 16-bit type, is refused before compute
    body, headers = framed({"inputs": [binary_input(storage, wire)]}, raw)
    message = error_of(app_client.post("/v2/models/sigmoid/infer", content=body, headers=headers))
    assert "output" in message and "binary" in message


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_binary_request_and_response(app_client, encoding):
    body, headers = framed({"inputs": [binary_input(X)],
                            "parameters": {"binary_data_output": True}}, X.tobytes())
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    r = app_client.post(URL, content=packed,
                    headers={**headers, "Content-Encoding": encoding, "Accept-Encoding": encoding})
    assert r.status_code == 200, r.text
    assert r.headers["content-encoding"] == encoding
    # httpx inflates transparently; the header length counts the inflated JSON
    header, raw = split_response(r)
    expected, _ = reference("relu", X, "float32")
    assert same_bits(np.frombuffer(raw, dtype="<f4"), expected)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(raw)


def test_no_compression_unless_asked(app_client):
    body, headers = framed({"inputs": [binary_input(X)]}, X.tobytes())
    r = app_client.post(URL, content=body, headers={**headers, "Accept-Encoding": "identity"})
    assert r.status_code == 200 and "content-encoding" not in r.headers


def test_garbage_compressed_body(app_client):
    r = app_client.post(URL, content=b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert "gzip" in error_of(r)
