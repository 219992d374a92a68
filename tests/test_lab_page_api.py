"""What the lab page registers with, as the registration spec says (docs/custom-activations.md):
``description`` on a registration (over HTTP, in the start-up file, with the engine process)
shown in the catalogue, and ``channels`` in a batch-norm spec checked against the lengths of
the statistics (400 when they differ)."""

from __future__ import annotations

import httpx
import pytest

from service.engine import custom
from service.errors import InvalidRequest
from tests.conftest import serve

BN = {"running_mean": [0.0, 1.0, 2.0], "running_var": [1.0, 2.0, 3.0]}


def _entry(url: str, name: str) -> tuple[dict, dict]:
    """The activation's catalogue entry, alone and in the full catalogue."""
    alone = httpx.get(f"{url}/v1/activations/{name}").json()
    listed = next(a for a in httpx.get(f"{url}/v1/activations").json()["activations"]
                  if a["name"] == name)
    return alone, listed


def test_description_is_kept_and_shown_in_the_catalogue():
    with serve() as srv:
        r = httpx.post(srv.url + "/v1/activations", json={
            "name": "gate", "expr": "relu(x) * sigmoid(x)",
            "description": "the article's ReLU·sigmoid gate"})
        assert r.status_code == 201, r.text
        assert r.json()["description"] == "the article's ReLU·sigmoid gate"
        for entry in _entry(srv.url, "gate"):
            assert entry["description"] == "the article's ReLU·sigmoid gate"
        r = httpx.post(srv.url + "/v1/activations", json={"name": "plain", "expr": "x * 2"})
        assert r.status_code == 201 and "description" not in r.json()
        r = httpx.post(srv.url + "/v1/activations", json={
            "name": "bn_desc", "expr": "relu(x)", "batch_norm": BN, "description": "bn then relu"})
        assert r.status_code == 201 and r.json()["description"] == "bn then relu"


@pytest.mark.parametrize("description", [42, ["a"], "x" * 501, None])
def test_a_bad_description_is_a_400(description):
    with pytest.raises(InvalidRequest, match="description must be a string of at most 500"):
        custom.build({"name": "d", "expr": "x", "description": description})


def test_description_in_the_start_up_file(tmp_path):
    path = tmp_path / "acts.toml"
    path.write_text('[[activation]]\nname = "gate"\nexpr = "relu(x) * sigmoid(x)"\n'
                    'description = "from the file"\n')
    with serve(activations_file=str(path)) as srv:
        for entry in _entry(srv.url, "gate"):
            assert entry["description"] == "from the file"


def test_description_with_the_engine_process():
    with serve(engine="process") as srv:
        r = httpx.post(srv.url + "/v1/activations", timeout=60, json={
            "name": "gate", "expr": "relu(x) * sigmoid(x)", "description": "served by the engine"})
        assert r.status_code == 201, r.text
        assert r.json()["description"] == "served by the engine"
        for entry in _entry(srv.url, "gate"):
            assert entry["description"] == "served by the engine"


def test_channels_equal_to_the_statistics_is_accepted():
    act = custom.build({"name": "b", "expr": "x", "batch_norm": {**BN, "channels": 3,
                                                                "weight": [1.0] * 3}})
    assert act.describe()["batch_norm"]["channels"] == 3


@pytest.mark.parametrize(("bn", "words"), [
    ({**BN, "channels": 4}, "running_mean has 3 values; channels is 4"),
    ({"channels": 2, "running_mean": [0.0, 1.0], "running_var": [1.0, 1.0, 1.0]},
     "running_var has 3 values; channels is 2"),
    ({**BN, "channels": 3, "weight": [1.0, 1.0]}, "weight has 2 values; channels is 3"),
    ({**BN, "channels": 3, "bias": [0.0] * 4}, "bias has 4 values; channels is 3"),
    ({**BN, "channels": 0}, r"channels must be an integer in \[1, 4096\]"),
    ({**BN, "channels": 3.0}, "channels must be an integer"),
    ({**BN, "channels": True}, "channels must be an integer"),
    ({**BN, "channels": "3"}, "channels must be an integer"),
])
def test_channels_that_differ_from_the_statistics_are_refused(bn, words):
    with pytest.raises(InvalidRequest, match=words):
        custom.build({"name": "b", "expr": "x", "batch_norm": bn})


def test_channels_over_http():
    with serve() as srv:
        r = httpx.post(srv.url + "/v1/activations", json={
            "name": "bn_bad", "expr": "relu(x)", "batch_norm": {**BN, "channels": 2}})
        assert r.status_code == 400
        assert "channels is 2" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/v1/activations/bn_bad").status_code == 404
        r = httpx.post(srv.url + "/v1/activations", json={
            "name": "bn_ok", "expr": "relu(x)", "batchnorm": {**BN, "channels": 3}})
        assert r.status_code == 201, r.text
        assert r.json()["batch_norm"]["channels"] == 3
        r = httpx.post(srv.url + "/v1/activations/bn_ok", json={"data": [[1.0, 2.0, 3.0]]})
        assert r.status_code == 200 and len(r.json()["data"][0]) == 3
