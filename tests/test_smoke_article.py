"""The seed article's examples give the article's printed results, over JSON and binary."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import reference, same_bits, wire_values

X = [-1.0, 0.0, 1.0, 2.0]
ARTICLE = {
    # name, params -> the article's printed output (4 decimals)
    ("relu", ()): [0.0, 0.0, 1.0, 2.0],
    ("leaky_relu", (("negative_slope", 0.01),)): [-0.0100, 0.0, 1.0, 2.0],
    ("sigmoid", ()): [0.2689, 0.5, 0.7311, 0.8808],
    ("tanh", ()): [-0.7616, 0.0, 0.7616, 0.9640],
    ("elu", (("alpha", 1.0),)): [-0.6321, 0.0, 1.0, 2.0],
}


@pytest.mark.parametrize(("name", "params"), list(ARTICLE))
def test_article_examples_json(app_client, name, params):
    r = app_client.post(f"/v1/activations/{name}", json={"data": X, "params": dict(params)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [4] and body["dtype"] == "float32"
    np.testing.assert_allclose(body["data"], ARTICLE[(name, params)], atol=5e-5)
    expected, _ = reference(name, wire_values(X, "float32"), "float32", params=dict(params))
    assert same_bits(np.asarray(body["data"], dtype=np.float32), expected)


@pytest.mark.parametrize(("name", "params"), list(ARTICLE))
def test_article_examples_binary(app_client, name, params):
    query = {"shape": "4", "dtype": "float32", **dict(params)}
    r = app_client.post(f"/v1/activations/{name}", params=query,
                    content=np.asarray(X, dtype="<f4").tobytes(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["x-shape"] == "4" and r.headers["x-dtype"] == "float32"
    out = np.frombuffer(r.content, dtype="<f4")
    np.testing.assert_allclose(out, ARTICLE[(name, params)], atol=5e-5)
    expected, _ = reference(name, wire_values(X, "float32"), "float32", params=dict(params))
    assert same_bits(out, expected)


def test_article_relu_sigmoid_gate(app_client):
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    # the article's custom_activation: relu(x) * sigmoid(x)
    r = app_client.post("/v1/activations/relu_sigmoid", json={"data": x.tolist()})
    assert r.status_code == 200, r.text
    out = np.asarray(r.json()["data"], dtype=np.float32)
    expected = np.maximum(x, 0) * (1 / (1 + np.exp(-x.astype(np.float64))))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(out[4:], [0.7311, 1.7616, 2.8577], atol=5e-5)
    ref, _ = reference("relu_sigmoid", x, "float32")
    assert same_bits(out, ref)
    rb = app_client.post("/v1/activations/relu_sigmoid", params={"shape": "7"}, content=x.tobytes(),
                     headers={"content-type": "application/octet-stream"})
    assert same_bits(np.frombuffer(rb.content, dtype="<f4"), ref)


def test_catalogue_lists_every_activation(app_client):
    r = app_client.get("/v1/activations")
    assert r.status_code == 200
    names = {a["name"] for a in r.json()["activations"]}
    assert {"relu", "leaky_relu", "sigmoid", "tanh", "elu", "relu_sigmoid", "gelu", "silu",
            "mish", "softplus", "selu", "celu", "hardtanh", "relu6", "hardsigmoid",
            "hardswish", "logsigmoid", "softsign", "tanhshrink"} <= names
    leaky = next(a for a in r.json()["activations"] if a["name"] == "leaky_relu")
    assert leaky["params"][0]["name"] == "negative_slope" and leaky["params"][0]["default"] == 0.01
    assert leaky["inplace"] is True


def test_health_and_readiness(app_client):
    assert app_client.get("/healthz").json() == {"status": "live"}
    assert app_client.get("/readyz").status_code == 200
