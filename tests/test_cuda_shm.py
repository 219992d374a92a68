"""Triton's CUDA shared-memory extension without a GPU: the bookkeeping's rules
(``CudaRegions``), the clear 400 of a CPU-only server, and the whole request path (HTTP,
the binary extension, gRPC; ``--engine inline`` and ``process``) through the test-only
emulated handle, which the engine maps from /dev/shm instead of calling
``cudaIpcOpenMemHandle`` (honoured only with fault injection on). The CUDA runtime calls
themselves are checked on a GPU only (tests/test_gpu_cuda_shm.py)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import signal

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import MAX_REGIONS, RegionNotFound
from service.engine.device_refs import emulated_handle
from service.errors import InvalidRequest

from .conftest import free_port, reference, same_bits, serve, wire_values

_ids = itertools.count()
HANDLE = b"\1" * 64
RNG = np.random.default_rng(3)
CASES = [("FP32", "float32"), ("FP16", "float16"), ("BF16", "bfloat16")]


# -- the bookkeeping (torch-free) -----------------------------------------------------------
class Engine:
    """Records what the bookkeeping asks of the engine; ``fail`` makes opening fail."""

    def __init__(self, fail: str | None = None) -> None:
        self.opened: list = []
        self.closed: list = []
        self.fail = fail

    async def open(self, name, raw, device_id, byte_size) -> None:
        if self.fail:
            raise InvalidRequest(self.fail)
        self.opened.append((name, raw, device_id, byte_size))

    async def close(self, name) -> None:
        self.closed.append(name)


def regions(devices=("cuda:0", "cuda:1"), engine=None, **kw) -> CudaRegions:
    engine = engine or Engine()
    return CudaRegions(list(devices), opener=engine.open, closer=engine.close, **kw)


def run(coro):
    return asyncio.run(coro)


def refused(fn, *args) -> str:
    with pytest.raises(InvalidRequest) as info:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            run(result)
    return str(info.value.message)


def test_register_checks_every_field_before_the_engine_opens_anything():
    engine = Engine()
    r = regions(engine=engine)
    assert "64-byte" in refused(r.register, "a", b"\0" * 63, 0, 64)
    assert "64-byte" in refused(r.register, "a", "not bytes", 0, 64)
    assert "device_id 2" in refused(r.register, "a", HANDLE, 2, 64)
    assert "device_id" in refused(r.register, "a", HANDLE, -1, 64)
    assert "byte_size" in refused(r.register, "a", HANDLE, 0, 0)
    assert "not allowed" in refused(r.register, "bad/name", HANDLE, 0, 64)
    assert engine.opened == []
    run(r.register("a", HANDLE, 1, 64))
    assert engine.opened == [("a", HANDLE, 1, 64)]
    assert "already registered" in refused(r.register, "a", HANDLE, 0, 64)
    assert r.status() == [{"name": "a", "device_id": 1, "byte_size": 64}]
    assert r.status("a") == r.status()


def test_a_handle_the_engine_cannot_open_is_not_registered():
    r = regions(engine=Engine(fail="region 'a': cudaIpcOpenMemHandle failed"))
    assert "cudaIpcOpenMemHandle" in refused(r.register, "a", HANDLE, 0, 64)
    assert r.status() == [] and "a" not in r
    r.opener = Engine().open  # the name is free again
    run(r.register("a", HANDLE, 0, 64))
    assert "a" in r


def test_unregister_one_or_all_closes_in_the_engine():
    engine = Engine()
    r = regions(engine=engine)
    for name in ("a", "b", "c"):
        run(r.register(name, HANDLE, 0, 64))
    run(r.unregister("b"))
    assert engine.closed == ["b"] and [s["name"] for s in r.status()] == ["a", "c"]
    with pytest.raises(RegionNotFound):
        run(r.unregister("b"))
    with pytest.raises(RegionNotFound):
        r.status("b")
    run(r.unregister(""))
    assert sorted(engine.closed) == ["a", "b", "c"] and r.status() == []


def test_at_most_max_regions():
    r = regions()
    for i in range(MAX_REGIONS):
        run(r.register(f"r{i}", HANDLE, 0, 64))
    assert f"at most {MAX_REGIONS}" in refused(r.register, "one-more", HANDLE, 0, 64)


def test_a_window_is_checked_against_the_registered_size():
    r = regions()
    run(r.register("a", HANDLE, 0, 100))
    ref = r.ref("a", 36, 64, "input 'input'")
    assert (ref.region, ref.offset, ref.nbytes) == ("a", 36, 64)
    assert "do not fit" in refused(r.ref, "a", 37, 64, "input 'input'")
    assert "shared_memory_offset" in refused(r.ref, "a", -1, 4, "input 'input'")
    assert "not registered" in refused(r.ref, "zz", 0, 4, "input 'input'")


def test_cpu_only_and_turned_off_servers_refuse_every_call():
    cpu = regions(devices=("cpu",))
    for call in (lambda: cpu.status(), lambda: cpu.register("a", HANDLE, 0, 64),
                 lambda: cpu.unregister("")):
        assert "no CUDA device" in refused(call)
    off = regions(enabled=False)
    assert "ACTSERVE_SHARED_MEMORY=false" in refused(off.register, "a", HANDLE, 0, 64)
    assert "ACTSERVE_SHARED_MEMORY=false" in refused(off.status)


def test_the_emulated_handle_is_refused_without_fault_injection():
    r = regions(devices=("cpu",), emulate=False)
    assert "no CUDA device" in refused(r.register, "a", emulated_handle("x"), 0, 64)


# -- a CPU-only server over HTTP ----------------------------------------------------------
def test_a_cpu_server_refuses_every_cuda_call_clearly(client):
    handle = {"raw_handle": {"b64": base64.b64encode(HANDLE).decode()}, "device_id": 0,
              "byte_size": 64}
    for method, path, body in [
            ("GET", "/v2/cudasharedmemory/status", None),
            ("GET", "/v2/cudasharedmemory/region/c0/status", None),
            ("POST", "/v2/cudasharedmemory/region/c0/register", handle),
            ("POST", "/v2/cudasharedmemory/region/c0/unregister", None),
            ("POST", "/v2/cudasharedmemory/unregister", None)]:
        r = client.request(method, path, json=body)
        assert r.status_code == 400 and "no CUDA device" in r.json()["error"], (path, r.text)
    assert "cuda_shared_memory" not in client.get("/v2").json()["extensions"]


# -- the request path, through the emulated handle ----------------------------------------
@pytest.fixture(scope="module", params=["inline", "process"])
def srv(request):
    port = free_port()
    with serve(fault_injection=True, engine=request.param, grpc_port=port) as s:
        s.target = f"127.0.0.1:{port}"
        yield s


@pytest.fixture()
def memory():
    """Client memory the emulated handle names (a /dev/shm object); destroyed after."""
    made = []

    def make(size: int):
        key = f"/actserve-cuda-test-{os.getpid()}-{next(_ids)}"
        handle = shm.create_shared_memory_region(key.lstrip("/"), key, size)
        made.append(handle)
        return handle, base64.b64encode(emulated_handle(key))

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture()
def hc(srv):
    client = th.InferenceServerClient(srv.url.removeprefix("http://"))
    yield client
    client.unregister_cuda_shared_memory()
    client.close()


def _storage_dtype(wire: str):
    return wire_values([0.0], wire).dtype


@pytest.mark.parametrize(("datatype", "wire"), CASES)
@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
def test_input_and_output_in_a_region_bit_for_bit_over_http(hc, memory, datatype, wire, name):
    x = wire_values(RNG.standard_normal(1000) * 3, wire)
    want, want_dtype = reference(name, x, wire)
    handle, raw = memory(4 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    hc.register_cuda_shared_memory("c0", raw, 0, 4 * x.nbytes)
    inp = th.InferInput("input", [x.size], datatype)
    inp.set_shared_memory("c0", x.nbytes)
    out = th.InferRequestedOutput("output")
    out.set_shared_memory("c0", want.nbytes, offset=2 * x.nbytes)
    r = hc.infer(name, [inp], outputs=[out])
    meta = r.get_output("output")
    assert meta["parameters"] == {"shared_memory_region": "c0",
                                  "shared_memory_byte_size": want.nbytes}
    got = shm.get_contents_as_numpy(handle, want.dtype, [x.size], offset=2 * x.nbytes)
    assert same_bits(got, want)
    # the answer in the body, the input still in the region
    r = hc.infer(name, [inp], outputs=[th.InferRequestedOutput("output", binary_data=True)])
    assert same_bits(r.as_numpy("output").view(want.dtype), want)
    assert want_dtype == wire


def test_inplace_never_modifies_the_clients_input(hc, memory):
    x = wire_values(np.linspace(-2, 2, 64), "float32")
    handle, raw = memory(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    hc.register_cuda_shared_memory("c0", raw, 0, x.nbytes)
    inp = th.InferInput("input", [64], "FP32")
    inp.set_shared_memory("c0", x.nbytes)
    r = hc.infer("relu", [inp], parameters={"inplace": True})
    assert same_bits(r.as_numpy("output"), np.maximum(x, 0))
    assert same_bits(shm.get_contents_as_numpy(handle, np.float32, [64]), x)


def test_the_body_in_and_a_region_out(hc, memory):
    x = wire_values(RNG.standard_normal((4, 8)), "float32")
    handle, raw = memory(x.nbytes)
    hc.register_cuda_shared_memory("out", raw, 0, x.nbytes)
    inp = th.InferInput("input", [4, 8], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = th.InferRequestedOutput("output")
    out.set_shared_memory("out", x.nbytes)
    r = hc.infer("tanh", [inp], outputs=[out])
    assert r.get_output("output")["shape"] == [4, 8]
    assert same_bits(shm.get_contents_as_numpy(handle, np.float32, [4, 8]),
                     reference("tanh", x, "float32")[0])


def _fails(fn, *args, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kw)
    return info.value


def test_windows_are_checked_at_every_use(hc, memory, srv):
    _handle, raw = memory(256)
    hc.register_cuda_shared_memory("c0", raw, 0, 256)
    inp = th.InferInput("input", [64], "FP32")
    inp.set_shared_memory("c0", 256, offset=4)
    assert "do not fit" in str(_fails(hc.infer, "relu", [inp]))
    inp = th.InferInput("input", [32], "FP32")
    inp.set_shared_memory("c0", 128, offset=2)
    assert "multiple of the 4-byte" in str(_fails(hc.infer, "relu", [inp]))
    inp.set_shared_memory("c0", 128)
    out = th.InferRequestedOutput("output")
    out.set_shared_memory("c0", 64, offset=0)
    assert "needs 128 bytes" in str(_fails(hc.infer, "relu", [inp], outputs=[out]))
    out.set_shared_memory("c0", 128, offset=192)
    assert "do not fit" in str(_fails(hc.infer, "relu", [inp], outputs=[out]))
    # gradients and reports carry more than the value: not through CUDA regions
    r = httpx.post(srv.url + "/v2/models/relu/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [32], "parameters": {
            "shared_memory_region": "c0", "shared_memory_byte_size": 128}}],
        "parameters": {"outputs": "value,grad"}})
    assert r.status_code == 400 and "CUDA shared memory carries the value alone" in r.text


def test_a_bad_handle_is_a_400_at_register_and_the_server_keeps_serving(hc, srv):
    bad = base64.b64encode(emulated_handle("actserve-no-such-object"))
    err = _fails(hc.register_cuda_shared_memory, "bad", bad, 0, 64)
    assert "400" in str(err.status()) and "'bad'" in str(err) and "cannot open" in str(err)
    assert hc.get_cuda_shared_memory_status() == []
    zeros = base64.b64encode(b"\0" * 64)  # not a handle this CPU server can open
    err = _fails(hc.register_cuda_shared_memory, "bad", zeros, 0, 64)
    assert "is not one of this server's CUDA devices (none)" in str(err)
    r = httpx.post(srv.url + "/v1/activations/relu", json={"data": [-1.0, 2.0]})
    assert r.status_code == 200 and r.json()["data"] == [0.0, 2.0]


def test_unregister_then_infer_is_a_clear_400(hc, memory):
    _handle, raw = memory(64)
    hc.register_cuda_shared_memory("c0", raw, 0, 64)
    inp = th.InferInput("input", [16], "FP32")
    inp.set_shared_memory("c0", 64)
    hc.infer("relu", [inp])
    hc.unregister_cuda_shared_memory("c0")
    assert "not registered" in str(_fails(hc.infer, "relu", [inp]))
    hc.register_cuda_shared_memory("c0", raw, 0, 64)  # the name is free again
    hc.infer("relu", [inp])


@pytest.mark.parametrize(("datatype", "wire"), CASES)
def test_grpc_register_status_infer_unregister(srv, memory, datatype, wire):
    x = wire_values(RNG.standard_normal(300), wire)
    want = reference("gelu", x, wire)[0]
    handle, raw = memory(2 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    with tg.InferenceServerClient(srv.target) as c:
        c.register_cuda_shared_memory("g0", raw, 0, 2 * x.nbytes)
        status = c.get_cuda_shared_memory_status(as_json=True)["regions"]["g0"]
        assert status["name"] == "g0" and int(status["byte_size"]) == 2 * x.nbytes
        inp = tg.InferInput("input", [x.size], datatype)
        inp.set_shared_memory("g0", x.nbytes)
        out = tg.InferRequestedOutput("output")
        out.set_shared_memory("g0", x.nbytes, offset=x.nbytes)
        r = c.infer("gelu", [inp], outputs=[out])
        assert r.get_output("output").parameters["shared_memory_region"].string_param == "g0"
        got = shm.get_contents_as_numpy(handle, want.dtype, [x.size], offset=x.nbytes)
        assert same_bits(got, want)
        r = c.infer("gelu", [inp])
        assert same_bits(r.as_numpy("output").view(want.dtype), want)
        c.unregister_cuda_shared_memory("g0")
        assert c.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
        err = _fails(c.infer, "gelu", [inp])
        assert err.status() == "StatusCode.INVALID_ARGUMENT"


def test_turned_off_and_auth(memory):
    _handle, raw = memory(64)
    body = {"raw_handle": {"b64": raw.decode()}, "device_id": 0, "byte_size": 64}
    with serve(fault_injection=True, shared_memory=False) as s:
        r = httpx.post(s.url + "/v2/cudasharedmemory/region/c0/register", json=body)
        assert r.status_code == 400 and "ACTSERVE_SHARED_MEMORY=false" in r.json()["error"]
    with serve(fault_injection=True, api_keys="secret") as s:
        url = s.url + "/v2/cudasharedmemory/region/c0/register"
        assert httpx.post(url, json=body).status_code == 401
        auth = {"authorization": "Bearer secret"}
        assert httpx.post(url, json=body, headers=auth).status_code == 200
        assert httpx.get(s.url + "/v2/cudasharedmemory/status", headers=auth).json() == [
            {"name": "c0", "device_id": 0, "byte_size": 64}]


@pytest.mark.parametrize("engine", ["inline", "process"])
def test_regions_are_scoped_to_the_api_key_that_registered_them(memory, engine):
    """With API keys on, a key sees, uses and removes only its own CUDA regions; two keys
    may use one name, each for its own memory (over HTTP and gRPC)."""
    x = wire_values(RNG.standard_normal(256), "float32")
    want, _ = reference("relu", x, "float32")
    mine, raw_mine = memory(2 * x.nbytes)
    theirs, raw_theirs = memory(2 * x.nbytes)
    shm.set_shared_memory_region(mine, [x])
    shm.set_shared_memory_region(theirs, [-x])
    port = free_port()
    with serve(fault_injection=True, api_keys="k1,k2", engine=engine, grpc_port=port) as s:
        k1, k2 = ({"authorization": f"Bearer {k}"} for k in ("k1", "k2"))

        def register(headers, raw):
            return httpx.post(s.url + "/v2/cudasharedmemory/region/c0/register", headers=headers,
                              json={"raw_handle": {"b64": raw.decode()}, "device_id": 0,
                                    "byte_size": 2 * x.nbytes})

        def infer(headers):
            body = {"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP32",
                                "parameters": {"shared_memory_region": "c0",
                                               "shared_memory_byte_size": x.nbytes}}],
                    "outputs": [{"name": "output", "parameters": {"binary_data": False}}]}
            return httpx.post(s.url + "/v2/models/relu/infer", json=body, headers=headers)

        assert register(k1, raw_mine).status_code == 200
        status = s.url + "/v2/cudasharedmemory/status"
        assert httpx.get(status, headers=k2).json() == []  # k2 sees none of k1's
        r = infer(k2)
        assert r.status_code == 400 and "not registered" in r.text
        assert register(k2, raw_theirs).status_code == 200  # the same name, its own memory
        got = {k: np.array(infer(h).json()["outputs"][0]["data"], np.float32)
               for k, h in (("k1", k1), ("k2", k2))}
        assert same_bits(got["k1"], want)
        assert same_bits(got["k2"], reference("relu", -x, "float32")[0])
        with tg.InferenceServerClient(f"127.0.0.1:{port}") as g:
            listed = g.get_cuda_shared_memory_status(headers=k2, as_json=True)
            assert [r["name"] for r in listed.get("regions", {}).values()] == ["c0"]
            g.unregister_cuda_shared_memory(headers=k2)  # all of k2's, none of k1's
        assert httpx.get(status, headers=k2).json() == []
        assert [r["name"] for r in httpx.get(status, headers=k1).json()] == ["c0"]
        assert same_bits(np.array(infer(k1).json()["outputs"][0]["data"], np.float32), want)


def test_a_restarted_engine_process_opens_the_regions_again(memory):
    from .test_engine_process import _engine_pid, _wait

    x = wire_values(np.linspace(-1, 1, 32), "float32")
    handle, raw = memory(2 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    with serve(fault_injection=True, engine="process") as s:
        c = th.InferenceServerClient(s.url.removeprefix("http://"))
        c.register_cuda_shared_memory("c0", raw, 0, 2 * x.nbytes)
        inp = th.InferInput("input", [32], "FP32")
        inp.set_shared_memory("c0", x.nbytes)
        out = th.InferRequestedOutput("output")
        out.set_shared_memory("c0", x.nbytes, offset=x.nbytes)
        os.kill(_engine_pid(s), signal.SIGKILL)
        _wait(lambda: not s.engine.ready)
        _wait(lambda: httpx.get(s.url + "/readyz").status_code == 200)
        c.infer("relu", [inp], outputs=[out])  # the new engine has the region
        got = shm.get_contents_as_numpy(handle, np.float32, [32], offset=x.nbytes)
        assert same_bits(got, np.maximum(x, 0))
        c.close()
