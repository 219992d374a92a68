"""Triton's system shared-memory extension over HTTP and gRPC, with the stock
``tritonclient.utils.shared_memory`` helpers: tensors in and out of registered regions bit
for bit, and the safety rules (plain keys under /dev/shm, sizes checked at every use, a
truncated or unlinked region answered 400 without hurting the server, regions released on
unregister and shutdown, the extension switchable off, registering needs a key)."""

from __future__ import annotations

import itertools
import os

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from .conftest import free_port, reference, same_bits, serve

_ids = itertools.count()
CASES = [("FP32", np.float32, "float32"), ("FP64", np.float64, "float64"),
         ("FP16", np.float16, "float16"), ("BF16", ml_dtypes.bfloat16, "bfloat16")]


def key() -> str:
    return f"/actserve-test-{os.getpid()}-{next(_ids)}"


@pytest.fixture(scope="module")
def srv():
    port = free_port()
    with serve(grpc_port=port) as s:
        s.target = f"127.0.0.1:{port}"
        yield s


@pytest.fixture(params=["http", "grpc"])
def proto(request, srv):
    """(client module, client) for one protocol; every region is unregistered after."""
    if request.param == "http":
        module, client = th, th.InferenceServerClient(srv.url.removeprefix("http://"))
    else:
        module, client = tg, tg.InferenceServerClient(srv.target)
    yield module, client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture()
def region():
    """A client-side shared-memory object factory; every object is destroyed after."""
    made = []

    def make(size: int):
        k = key()
        handle = shm.create_shared_memory_region(k.lstrip("/"), k, size)
        made.append(handle)
        return handle, k

    yield make
    for handle in made:
        try:
            shm.destroy_shared_memory_region(handle)
        except Exception:  # the test unlinked or truncated it itself
            pass


def fail(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def shm_request(module, name_in, name_out, x, datatype, out_bytes, in_offset=0, out_offset=0):
    inp = module.InferInput("input", list(x.shape), datatype)
    inp.set_shared_memory(name_in, x.nbytes, offset=in_offset)
    out = (module.InferRequestedOutput("output", binary_data=True) if module is th
           else module.InferRequestedOutput("output"))
    out.set_shared_memory(name_out, out_bytes, offset=out_offset)
    return [inp], [out]


@pytest.mark.parametrize(("datatype", "np_dtype", "wire"), CASES)
def test_inputs_and_outputs_through_one_region_bit_exact(proto, region, datatype, np_dtype, wire):
    module, client = proto
    rng = np.random.default_rng(7)
    x = rng.normal(0, 3, size=(4, 33)).astype(np.float32).astype(np_dtype)
    handle, k = region(64 + 2 * x.nbytes)
    shm.set_shared_memory_region(handle, [x], offset=64)
    client.register_system_shared_memory("io", k, 2 * x.nbytes, offset=64)
    status = client.get_system_shared_memory_status(**({"as_json": True} if module is tg else {}))
    listed = status if module is th else list(status["regions"].values())
    assert [(r["name"], r["key"], int(r.get("offset", 0)), int(r["byte_size"]))
            for r in listed] == [("io", k, 64, 2 * x.nbytes)]
    inputs, outputs = shm_request(module, "io", "io", x, datatype, x.nbytes,
                                  out_offset=x.nbytes)
    result = client.infer("gelu", inputs, outputs=outputs)
    params = result.get_output("output")
    params = params["parameters"] if module is th else {
        k2: v.string_param or v.int64_param for k2, v in params.parameters.items()}
    assert params["shared_memory_region"] == "io"
    assert int(params["shared_memory_byte_size"]) == x.nbytes
    np_out = ml_dtypes.bfloat16 if wire == "bfloat16" else np_dtype
    got = shm.get_contents_as_numpy(handle, np_out, x.shape, offset=64 + x.nbytes)
    view = (lambda a: a.view(np.uint16)) if wire == "bfloat16" else (lambda a: a)
    expected, _ = reference("gelu", view(x), wire)
    assert same_bits(view(np.ascontiguousarray(got)), expected)
    # the input is untouched, and an output region may come back as raw bytes instead
    inp = module.InferInput("input", list(x.shape), datatype)
    inp.set_shared_memory("io", x.nbytes)
    plain = client.infer("gelu", [inp])
    assert same_bits(view(plain.as_numpy("output")), expected)


def test_register_refusals(proto, region):
    _module, client = proto
    _handle, k = region(1024)
    for bad in ("/../etc/passwd", "/a/b", "..", "", "/dev/shm/x"):
        err = fail(client.register_system_shared_memory, "r", bad, 16)
        assert "not allowed" in err.message(), bad
    err = fail(client.register_system_shared_memory, "r", k + "-missing", 16)
    assert "does not exist" in err.message()
    fifo = "/dev/shm/" + k.lstrip("/") + "-fifo"
    os.mkfifo(fifo)  # would block a plain open() for ever
    try:
        err = fail(client.register_system_shared_memory, "r", k + "-fifo", 16)
        assert "not a shared memory object" in err.message()
    finally:
        os.unlink(fifo)
    arena = f"/dev/shm/actserve-{os.getpid()}-0badcafe"  # an engine arena's name
    with open(arena, "wb") as f:
        f.write(b"\0" * 64)
    try:
        err = fail(client.register_system_shared_memory, "r", arena.removeprefix("/dev/shm"), 64)
        assert "reserved" in err.message()
    finally:
        os.unlink(arena)
    link = "/dev/shm/" + k.lstrip("/") + "-link"
    os.symlink("/etc/hostname", link)  # a key may not lead out of /dev/shm
    try:
        err = fail(client.register_system_shared_memory, "r", k + "-link", 1)
        assert "cannot open shared memory key" in err.message()
    finally:
        os.unlink(link)
    err = fail(client.register_system_shared_memory, "r", k, 1024, offset=1)
    assert "beyond the end" in err.message()
    client.register_system_shared_memory("r", k, 1024)
    err = fail(client.register_system_shared_memory, "r", k, 16)
    assert "already registered" in err.message()
    client.unregister_system_shared_memory("r")
    err = fail(client.unregister_system_shared_memory, "r")
    assert "no shared memory region named 'r'" in err.message()
    assert err.status() in ("404", "StatusCode.NOT_FOUND")


def test_use_refusals(proto, region):
    module, client = proto
    x = np.arange(-8, 8, dtype=np.float32)
    handle, k = region(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("u", k, x.nbytes)
    inputs, outputs = shm_request(module, "u", "u", x, "FP32", x.nbytes)
    inputs[0].set_shared_memory("u", x.nbytes - 4)
    err = fail(client.infer, "relu", inputs, outputs=outputs)
    assert "needs 64 bytes" in err.message()
    inputs[0].set_shared_memory("u", x.nbytes, offset=4)
    assert "do not fit" in fail(client.infer, "relu", inputs, outputs=outputs).message()
    inputs[0].set_shared_memory("nope", x.nbytes)
    assert "not registered" in fail(client.infer, "relu", inputs, outputs=outputs).message()
    inputs, outputs = shm_request(module, "u", "u", x, "FP32", x.nbytes)
    err = fail(client.infer, "relu", inputs, outputs=outputs,
               parameters={"compute_dtype": "float64"})  # 128 bytes into a 64-byte window
    assert "needs 128 bytes" in err.message()
    assert same_bits(shm.get_contents_as_numpy(handle, np.float32, x.shape), x)  # untouched


def test_truncated_or_unlinked_region_is_a_clear_400_and_the_server_lives_on(proto, region, srv):
    module, client = proto
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    handle, k = region(2 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("t", k, 2 * x.nbytes)
    inputs, outputs = shm_request(module, "t", "t", x, "FP32", x.nbytes, out_offset=x.nbytes)
    assert client.infer("relu", inputs, outputs=outputs) is not None
    path = "/dev/shm/" + k.lstrip("/")
    os.truncate(path, x.nbytes // 2)  # the input now runs past the end of the object
    err = fail(client.infer, "relu", inputs, outputs=outputs)
    assert err.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    assert "truncated" in err.message()
    os.truncate(path, x.nbytes + 16)  # the input fits again, the output does not
    err = fail(client.infer, "relu", inputs, outputs=outputs)
    assert "truncated" in err.message()
    assert os.stat(path).st_size == x.nbytes + 16  # the server did not grow it back
    os.unlink(path)
    err = fail(client.infer, "relu", inputs, outputs=outputs)
    assert "removed" in err.message()
    ok = httpx.post(srv.url + "/v1/activations/relu", json={"data": [-1.0, 2.0]})
    assert ok.status_code == 200 and ok.json()["data"] == [0.0, 2.0]


def _fds_on(path: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(path)
        except OSError:
            pass
    return count


def test_regions_released_on_unregister_and_shutdown(region):
    _handle, k = region(4096)
    path = "/dev/shm/" + k.lstrip("/")
    port = free_port()
    before = _fds_on(path)  # the client's own mapping keeps none open
    with serve(grpc_port=port) as s:
        c = tg.InferenceServerClient(f"127.0.0.1:{port}")
        c.register_system_shared_memory("a", k, 4096)
        c.register_system_shared_memory("b", k, 1024, offset=1024)
        assert _fds_on(path) == before + 2
        c.unregister_system_shared_memory("a")
        assert _fds_on(path) == before + 1
        c.close()
    assert _fds_on(path) == before  # shutdown closed the last one
    assert s.services.regions is not None and len(s.services.regions) == 0


def test_extension_off():
    port = free_port()
    with serve(grpc_port=port, shared_memory=False) as s:
        meta = httpx.get(s.url + "/v2").json()
        assert "system_shared_memory" not in meta["extensions"]
        r = httpx.post(s.url + "/v2/systemsharedmemory/region/x/register",
                       json={"key": "/x", "offset": 0, "byte_size": 4})
        assert r.status_code == 400 and "turned off" in r.json()["error"]
        with tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
            err = fail(c.get_system_shared_memory_status)
            assert err.status() == "StatusCode.INVALID_ARGUMENT" and "turned off" in err.message()


def test_registering_needs_a_key(region):
    _handle, k = region(64)
    with serve(api_keys="secret") as s:
        body = {"key": k, "offset": 0, "byte_size": 64}
        url = s.url + "/v2/systemsharedmemory/region/k/register"
        assert httpx.post(url, json=body).status_code == 401
        auth = {"authorization": "Bearer secret"}
        assert httpx.post(url, json=body, headers=auth).status_code == 200
        status = httpx.get(s.url + "/v2/systemsharedmemory/status", headers=auth).json()
        assert status == [{"name": "k", "key": k, "offset": 0, "byte_size": 64}]


def test_register_body_is_bounded(srv):
    r = httpx.post(srv.url + "/v2/systemsharedmemory/region/big/register",
                   content=b'{"key": "/x", "pad": "' + b"a" * (128 * 1024) + b'"}')
    assert r.status_code == 413
    r = httpx.post(srv.url + "/v2/systemsharedmemory/region/big/register", content=b"[1]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
