"""The SDK's ``shared_memory="auto"``: tensors of 1 MiB and more travel through system
shared memory when the probe shows the server reads this host's regions, with results bit
for bit those of the HTTP path; otherwise (extension off) every call goes over HTTP."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from actserve_client import Client

from .conftest import serve

RNG = np.random.default_rng(2026)
BIG = 1 << 19  # elements: 1 MiB of float16, the smallest dtype


@pytest.fixture(scope="module")
def srv():
    with serve() as s:
        yield s


def _ours(prefix: str = "actserve-") -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{prefix}{os.getpid()}-")}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_auto_is_bit_exact_with_http(srv, dtype):
    x = (RNG.standard_normal(BIG) * 3).astype(np.float32).astype(dtype).reshape(512, -1)
    with Client(srv.url, shared_memory="auto") as shm, Client(srv.url) as http:
        for kwargs in ({}, {"compute_dtype": "float64"}, {"amp": True},
                       {"negative_slope": 0.3}):
            name = "leaky_relu" if "negative_slope" in kwargs else "gelu"
            a, b = shm.activate(name, x, **kwargs), http.activate(name, x, **kwargs)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert shm.uses_shared_memory
        many = shm.activate_many("relu", [x, x[:3], x * 2], concurrency=3)
        assert [m.tobytes() for m in many] == [http.activate("relu", v).tobytes()
                                               for v in (x, x[:3], x * 2)]
        assert srv.services.regions is not None and len(srv.services.regions) >= 1
    assert len(srv.services.regions) == 0  # close() unregistered every region
    assert not _ours()  # and removed them


def test_small_tensors_never_touch_shared_memory(srv):
    with Client(srv.url, shared_memory="auto") as c:
        x = np.linspace(-1, 1, 1000, dtype=np.float32)
        assert c.activate("relu", x).tobytes() == np.maximum(x, 0).tobytes()
        assert not c.uses_shared_memory and len(srv.services.regions) == 0


def test_falls_back_to_http_when_the_server_cannot_use_it():
    with serve(shared_memory=False) as s, Client(s.url, shared_memory="auto") as c:
        x = RNG.standard_normal(BIG).astype(np.float32)
        assert c.activate("relu", x).tobytes() == np.maximum(x, 0).tobytes()
        assert not c.uses_shared_memory
    assert not _ours()


def test_mode_is_checked():
    with pytest.raises(ValueError, match="shared_memory"):
        Client("http://127.0.0.1:1", shared_memory="always")


def test_async_client_auto(srv):
    import asyncio

    from actserve_client import AsyncClient

    x = RNG.standard_normal(BIG).astype(np.float32)

    async def run():
        async with AsyncClient(srv.url, shared_memory="auto") as c:
            outs = await c.activate_many("silu", [x, -x], concurrency=2)
            return outs, c.uses_shared_memory

    outs, used = asyncio.run(run())
    with Client(srv.url) as http:
        assert [o.tobytes() for o in outs] == [http.activate("silu", v).tobytes() for v in (x, -x)]
    assert used and len(srv.services.regions) == 0 and not _ours()
