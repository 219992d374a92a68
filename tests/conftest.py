"""Shared fixtures: real uvicorn servers on 127.0.0.1 (in a thread, or as a subprocess),
and the reference computation the server's answers are compared with, bit for bit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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

from service import dtypes
from service.engine.activations import Registry
from service.engine.compute import apply_alone, tensor_storage, wire_tensor
from service.engine.job import Job, Mode
from service.http.app import create_app
from service.http.server import uvicorn_config
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = 1  # the server's default; the reference must use the same count
torch.set_num_threads(TORCH_THREADS)
REGISTRY = Registry()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


SUBPROCESS_LOGS: list[Path] = []


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str,
               output=lambda: "") -> None:
    """Poll ``url`` until it answers 200; fail with the child's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {output()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready at {url}")
        time.sleep(0.05)


@contextmanager
def subprocess_server(env_overrides: dict | None = None, port: int | None = None):
    """``python -m service serve`` as a child process; yields (process, url)."""
    port = port or free_port()
    env = {**os.environ, "ACTSERVE_PORT": str(port), "ACTSERVE_HOST": "127.0.0.1",
           "ACTSERVE_ACCESS_LOG": "false", "ACTSERVE_GRPC_PORT": "0", **(env_overrides or {})}
    # The server's output goes to a file (a pipe nobody reads could fill and stall it);
    # SUBPROCESS_LOGS lists the files so a failing test can show them.
    log_path = Path(tempfile.mkstemp(prefix=f"actserve-{port}-", suffix=".log")[1])
    SUBPROCESS_LOGS.append(log_path)
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # the server's output so far: proc.log_path.read_text()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url + "/readyz", 90, "actserve", lambda: log_path.read_text())
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# -- the reference ----------------------------------------------------------------------
def reference(name: str, values: np.ndarray, wire: str, *, params: dict | None = None,
              compute_dtype: str | None = None, amp: bool = False, amp_dtype: str | None = None,
              inplace: bool = False) -> tuple[np.ndarray, str]:
    """``torch.nn.functional`` (through the registry) applied to this request alone, on CPU.
    ``values`` is wire storage; returns (output storage, output dtype name)."""
    act = REGISTRY.get(name)
    job = Job(activation=act, params=act.parse_params(params or {}), array=values.copy(),
              wire_dtype=wire, mode=Mode(compute_dtype, amp, amp_dtype, inplace),
              deadline=float("inf"))
    with torch.inference_mode():
        y = apply_alone(job, wire_tensor(job.array, wire))
        return tensor_storage(y.contiguous()).copy(), str(y.dtype).removeprefix("torch.")


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
