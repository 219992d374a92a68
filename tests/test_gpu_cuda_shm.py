"""CUDA shared memory on a GPU (Triton's ``cudasharedmemory`` extension): device tensors
handed over by CUDA IPC handle, over HTTP and gRPC, with ``--engine process`` (the CUDA
default) and ``--engine inline``. The server runs as a child process (a CUDA IPC handle
cannot be opened by the process that exported it). Every answer equals
``torch.nn.functional`` on the same device, bit for bit. Skipped cleanly without CUDA; the
tests with the stock ``tritonclient.utils.cuda_shared_memory`` helpers also need
``cuda-python`` (skipped with the reason when it is missing); the ones with torch's own
IPC handles need only torch."""

from __future__ import annotations

import base64
import importlib

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from .conftest import free_port, subprocess_server

pytestmark = pytest.mark.gpu

CASES = [("FP32", torch.float32), ("FP16", torch.float16), ("BF16", torch.bfloat16)]
FUNCS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _cudashm():
    try:
        return importlib.import_module("tritonclient.utils.cuda_shared_memory")
    except ImportError as exc:
        pytest.skip(f"tritonclient.utils.cuda_shared_memory is not importable ({exc}); "
                    "install cuda-python")


@pytest.fixture(scope="module", params=["process", "inline"])
def gsrv(request):
    grpc_port = free_port()
    env = {"ACTSERVE_DEVICE": "cuda", "ACTSERVE_ENGINE": request.param,
           "ACTSERVE_GRPC_PORT": str(grpc_port)}
    with subprocess_server(env) as (_proc, url):
        yield url, f"127.0.0.1:{grpc_port}"


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _sample(dtype: torch.dtype, n: int = 4099) -> torch.Tensor:
    g = torch.Generator(device="cuda:0").manual_seed(n)
    return (torch.randn(n, device="cuda:0", generator=g) * 3).to(dtype)


def _client(proto: str, gsrv):
    url, target = gsrv
    if proto == "http":
        return th, th.InferenceServerClient(url.removeprefix("http://"))
    return tg, tg.InferenceServerClient(target)


# -- with the stock tritonclient helpers ------------------------------------------------------
@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize(("datatype", "dtype"), CASES)
def test_tritonclient_regions_bit_for_bit(gsrv, proto, datatype, dtype):
    cudashm = _cudashm()
    module, c = _client(proto, gsrv)
    x = _sample(dtype)
    nbytes = x.numel() * x.element_size()
    src = cudashm.create_shared_memory_region("in", nbytes, 0)
    dst = cudashm.create_shared_memory_region("out", nbytes, 0)
    try:
        # raw bytes through DLPack (a device-to-device copy; uint8 for every dtype)
        cudashm.set_shared_memory_region_from_dlpack(src, [x.view(torch.uint8)])
        c.register_cuda_shared_memory("in", cudashm.get_raw_handle(src), 0, nbytes)
        c.register_cuda_shared_memory("out", cudashm.get_raw_handle(dst), 0, nbytes)
        for name, fn in FUNCS.items():
            want = fn(x)
            torch.cuda.synchronize()
            inp = module.InferInput("input", [x.numel()], datatype)
            inp.set_shared_memory("in", nbytes)
            out = module.InferRequestedOutput("output")
            out.set_shared_memory("out", nbytes)
            c.infer(name, [inp], outputs=[out])  # device to device
            got = cudashm.get_contents_as_numpy(dst, np.uint8, [nbytes])
            assert got.tobytes() == _bits(want), (name, datatype)
            kw = {"binary_data": True} if module is th else {}
            r = c.infer(name, [inp], outputs=[module.InferRequestedOutput("output", **kw)])
            assert r.as_numpy("output").tobytes() == _bits(want), (name, datatype)  # body
        assert cudashm.get_contents_as_numpy(src, np.uint8, [nbytes]).tobytes() == _bits(x)
        c.unregister_cuda_shared_memory("in")
        c.unregister_cuda_shared_memory()
        with pytest.raises(InferenceServerException):
            c.infer("relu", [inp])
    finally:
        c.close()
        cudashm.destroy_shared_memory_region(src)
        cudashm.destroy_shared_memory_region(dst)


# -- with torch's own IPC handles (no cuda-python needed) ---------------------------------------
def _torch_handle(t: torch.Tensor) -> tuple[bytes, int, int]:
    """(64-byte cudaIpcMemHandle of the allocation, its size, the tensor's offset in it)."""
    shared = t.untyped_storage()._share_cuda_()
    handle, size, offset = shared[1], int(shared[2]), int(shared[3])
    assert len(handle) == 64
    return handle, offset + size, offset + t.storage_offset() * t.element_size()


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize(("datatype", "dtype"), CASES)
def test_torch_ipc_handles_bit_for_bit(gsrv, proto, datatype, dtype):
    """Input and output in one allocation (small tensors share the caching allocator's
    segments, so one handle is registered once), at their offsets in it."""
    module, c = _client(proto, gsrv)
    n = 1000
    buf = torch.zeros(2 * n + 64, dtype=dtype, device="cuda:0")
    x, y = buf[:n], buf[n + 64:]
    x.copy_(_sample(dtype, n))
    x0 = x.clone()
    torch.cuda.synchronize()
    nbytes = n * x.element_size()
    handle, size, off_x = _torch_handle(x)
    off_y = off_x + (n + 64) * x.element_size()
    try:
        c.register_cuda_shared_memory("t", base64.b64encode(handle), 0, size)
        for name, fn in FUNCS.items():
            for inplace in (False, True):
                inp = module.InferInput("input", [n], datatype)
                inp.set_shared_memory("t", nbytes, offset=off_x)
                out = module.InferRequestedOutput("output")
                out.set_shared_memory("t", nbytes, offset=off_y)
                c.infer(name, [inp], outputs=[out], parameters={"inplace": inplace})
                torch.cuda.synchronize()
                assert _bits(y) == _bits(fn(x)), (name, datatype, inplace)
                assert _bits(x) == _bits(x0)  # in place or not, the input is the client's
        status = c.get_cuda_shared_memory_status(**({} if module is th else {"as_json": True}))
        assert len(status if module is th else status["regions"]) == 1
    finally:
        c.unregister_cuda_shared_memory()
        c.close()


def test_a_bad_handle_is_a_400_and_the_server_keeps_serving(gsrv):
    url, _ = gsrv
    body = {"raw_handle": {"b64": base64.b64encode(b"\0" * 64).decode()}, "device_id": 0,
            "byte_size": 1024}
    r = httpx.post(url + "/v2/cudasharedmemory/region/bad/register", json=body)
    assert r.status_code == 400 and "'bad'" in r.json()["error"], r.text
    body["device_id"] = torch.cuda.device_count()
    r = httpx.post(url + "/v2/cudasharedmemory/region/bad/register", json=body)
    assert r.status_code == 400 and "device_id" in r.json()["error"], r.text
    assert httpx.get(url + "/v2/cudasharedmemory/status").json() == []
    r = httpx.post(url + "/v1/activations/relu", json={"data": [-1.0, 2.0]})
    assert r.status_code == 200 and r.json()["data"] == [0.0, 2.0]
    assert httpx.get(url + "/readyz").status_code == 200
    assert "cuda_shared_memory" in httpx.get(url + "/v2").json()["extensions"]
