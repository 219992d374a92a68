"""Reports as plug-ins (``service/engine/reports``): every registered report, through every
wire format, on a real server: carried (native JSON ``report``, native binary header or JSON
part, v2 JSON and binary response parameters, gRPC parameters), or refused with a 400 that
names it. Three made-up reports are plugged in by one registry entry each (a header one, a
part one, one that native binary refuses), computed by a function of this module, and walked
with the real ones: a new report is never silently dropped by a format."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.engine import reports
from service.engine.reports import REGISTRY, WIRES, BaseReport
from service.errors import InvalidRequest
from service.settings import Settings

X = np.array([-1.5, 0.0, 2.5], dtype=np.float32)


def fake_after(job, answer) -> dict:
    """A made-up report's computation, in the compute thread: what it saw."""
    return {"elements": int(answer.numel()), "activation": job.activation.name}


def fake_around(job, device, run):
    out = run()
    return out, {"wrapped": True, "device": str(device)}


class FakeHeader(BaseReport):
    name = "fake_header"
    compute = f"{__name__}:fake_after"


class FakePart(BaseReport):
    name = "fake_part"
    compute = f"{__name__}:fake_around"
    stage = "around"
    binary = "part"


class FakeNotInBinary(BaseReport):
    name = "fake_nobinary"
    compute = f"{__name__}:fake_after"

    def refuses(self, wire: str) -> str | None:
        return "it is too large for a header" if wire == "native-binary" else None


FAKES = (FakeHeader(), FakePart(), FakeNotInBinary())
EXPECTED = {  # what each made-up report must say, wherever it is carried
    "fake_header": {"elements": 3, "activation": "relu"},
    "fake_part": {"wrapped": True, "device": "cpu"},
    "fake_nobinary": {"elements": 3, "activation": "relu"},
}


@pytest.fixture()
def plugged(monkeypatch):
    for fake in FAKES:
        monkeypatch.setitem(REGISTRY, fake.name, fake)
    yield


def _native_json(c, grpc, name):
    r = c.post("/v1/activations/relu", json={"data": X.tolist(), "report": [name]})
    return r, (lambda: r.json()["report"][name])


def _native_binary(c, grpc, name):
    r = c.post("/v1/activations/relu", content=X.tobytes(),
               params={"shape": "3", "report": name},
               headers={"content-type": "application/octet-stream"})

    def found():
        if REGISTRY[name].binary == "header":
            return json.loads(r.headers[reports.header(name)])
        outputs = r.headers["x-outputs"].split(",")
        sizes = [int(n) for n in r.headers["x-output-bytes"].split(",")]
        at = sum(sizes[:outputs.index(name)])
        assert r.headers["x-output-dtypes"].split(",")[outputs.index(name)] == "json"
        return json.loads(r.content[at:at + sizes[outputs.index(name)]])
    return r, found


def _v2_json(c, grpc, name):
    r = c.post("/v2/models/relu/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [3], "data": X.tolist()}],
        "parameters": {"report": name}})
    return r, (lambda: json.loads(r.json()["parameters"][reports.parameter(name)]))


def _v2_binary(c, grpc, name):
    head = json.dumps({"inputs": [{"name": "input", "shape": [3], "datatype": "FP32",
                                   "parameters": {"binary_data_size": X.nbytes}}],
                       "parameters": {"report": name, "binary_data_output": True}}).encode()
    r = c.post("/v2/models/relu/infer", content=head + X.tobytes(),
               headers={"Inference-Header-Content-Length": str(len(head))})

    def found():
        n = int(r.headers["inference-header-content-length"])
        assert r.content[n:] == np.maximum(X, 0).tobytes()
        return json.loads(json.loads(r.content[:n])["parameters"][reports.parameter(name)])
    return r, found


def _grpc(c, grpc, name):
    import tritonclient.grpc as tg

    x = tg.InferInput("input", [3], "FP32")
    x.set_data_from_numpy(X)
    try:
        res = grpc.infer("relu", [x], parameters={"report": name})
    except tg.InferenceServerException as exc:
        return _Refused(exc), None
    return None, (lambda: json.loads(
        res.get_response().parameters[reports.parameter(name)].string_param))


class _Refused:
    status_code = 400

    def __init__(self, exc) -> None:
        self.text = exc.message()


SENDERS = {"native-json": [_native_json], "native-binary": [_native_binary],
           "v2": [_v2_json, _v2_binary], "grpc": [_grpc]}


def test_every_wire_format_is_walked():
    assert set(SENDERS) == set(WIRES)


def test_every_report_through_every_wire_format(plugged):
    import tritonclient.grpc as tg

    from loadtest.servers import free_port

    from .conftest import serve

    port = free_port()
    seen = set()
    with serve(allow_profile=True, grpc_port=port) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c, \
            tg.InferenceServerClient(f"127.0.0.1:{port}") as grpc:
        for name, report in REGISTRY.items():
            for wire in WIRES:
                problem = report.refuses(wire)
                for send in SENDERS[wire]:
                    r, found = send(c, grpc, name)
                    where = f"{name} over {send.__name__}"
                    if problem:
                        assert r is not None and r.status_code == 400, where
                        assert name in r.text and problem in r.text, (where, r.text)
                        seen.add((name, wire, "refused"))
                        continue
                    assert r is None or r.status_code == 200, (where, r.text)
                    value = found()
                    if name in EXPECTED:
                        assert value == EXPECTED[name], where
                    else:
                        assert isinstance(value, dict) and value, where
                    seen.add((name, wire, "carried"))
    assert {(n, w) for n, w, _ in seen} == {(n, w) for n in REGISTRY for w in WIRES}
    assert ("fake_nobinary", "native-binary", "refused") in seen


def test_a_report_is_one_registry_entry(plugged):
    """The request side reads the registry too: names, their order, refusals."""
    assert reports.names() == ("numerics", "profile", *(f.name for f in FAKES))
    with pytest.raises(InvalidRequest, match="fake_nobinary report cannot travel in "
                                             "native-binary: it is too large"):
        reports.check_wire({"fake_nobinary"}, "native-binary", "request")
    reports.check_wire({"fake_nobinary"}, "native-json", "request")
    assert reports.header("fake_header") == "X-Report-Fake-Header"


def test_the_channel_conversions_round_trip():
    """Every report as the engine channel carries it and back (the profile's trace travels
    as text and comes back as bytes)."""
    from service.engine.ipc import channel, messages

    sent = {"numerics": {"max_ulp_error": 0.5},
            "profile": {"device": "cpu", "operators": [], "trace": b'{"traceEvents": []}'}}
    done = messages.Done(1, "float32", (3,), 0.0, 1, 3, "cpu", 0.0, {}, None, None,
                         reports.to_channel({k: dict(v) for k, v in sent.items()}))
    back = messages.for_worker(channel.pack(done)[channel.HEAD.size:])
    assert reports.from_channel(back.reports) == sent


def test_working_set_and_checks_come_from_the_registry(plugged):
    from service.engine.jobs import working_set

    base = working_set(10, 4, 4, 1, ("value",), frozenset(), False)
    assert working_set(10, 4, 4, 1, ("value",), frozenset({"numerics"}), False) == \
        base + 10 * REGISTRY["numerics"].bytes_per_element(1)
    assert working_set(10, 4, 4, 1, ("value",), frozenset({"fake_header"}), False) == base
    with pytest.raises(InvalidRequest, match="profiles are off"):
        REGISTRY["profile"].check(Settings(allow_profile=False), "request")
