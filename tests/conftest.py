"""Shared fixtures: real uvicorn servers on 127.0.0.1 (in a thread, or as a subprocess),
and the reference computation the server's answers are compared with, bit for bit.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from loadtest.servers import free_port, start_actserve, wait_ready
from service import dtypes
from service.engine.activations import Registry
from service.engine.job import Mode
from service.engine.reference import reference as lone_reference
from service.http.app import create_app
from service.http.server import uvicorn_config
from service.settings import Settings

# Fusion (service/engine/fusion.py) compiles every registered custom activation with
# torch.compile, seconds of CPU each; the servers of the tests run eager unless a test asks
# for fusion (tests/test_fusion.py). The product default stays "auto".
os.environ.setdefault("ACTSERVE_FUSION", "off")
ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = 1  # the server's default; the reference must use the same count
torch.set_num_threads(TORCH_THREADS)
REGISTRY = Registry()


class ThreadServer:
    """A real uvicorn server for one app, on 127.0.0.1, run in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.services = self.app.state.services
        self.engine = self.services.engine
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def loop(self):
        return self.engine.pool.loop


@contextmanager
def serve(**overrides) -> Iterator[ThreadServer]:
    overrides.setdefault("port", free_port())
    overrides.setdefault("access_log", False)
    overrides.setdefault("grpc_port", 0)  # gRPC only where a test asks for it
    with ThreadServer(Settings(**overrides)) as srv:
        yield srv


@pytest.fixture(scope="session")
def server() -> Iterator[ThreadServer]:
    """One shared server with default settings for tests that need no special config."""
    with serve() as srv:
        yield srv


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@contextmanager
def subprocess_server(env_overrides: dict | None = None, port: int | None = None):
    """``python -m service serve`` as a child process (``loadtest.servers.start_actserve``,
    log level info as by default); yields (process, url) once it is ready. The server's
    output so far: ``proc.log_path.read_text()``."""
    log_dir = Path(tempfile.mkdtemp(prefix="actserve-test-"))
    child = start_actserve("actserve", log_dir, port=port,
                           env={"ACTSERVE_LOG_LEVEL": "info", **(env_overrides or {})})
    child.proc.log_path = child.log
    try:
        wait_ready(child.proc, child.url + "/readyz", 90, "actserve", child.output)
        yield child.proc, child.url
    finally:
        child.stop(grace_s=5)


# -- the reference ----------------------------------------------------------------------
def reference(name: str, values: np.ndarray, wire: str, *, params: dict | None = None,
              compute_dtype: str | None = None, amp: bool = False, amp_dtype: str | None = None,
              inplace: bool = False) -> tuple[np.ndarray, str]:
    """``torch.nn.functional`` (through the registry) applied to this request alone, on CPU
    (``service.engine.reference``). ``values`` is wire storage; returns (output storage,
    output dtype name)."""
    act = REGISTRY.get(name)
    return lone_reference(act, act.parse_params(params or {}), values, wire,
                          Mode(compute_dtype, amp, amp_dtype, inplace))


def wire_values(values, wire: str) -> np.ndarray:
    return dtypes.from_float(np.asarray(values, dtype=np.float64), wire)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
