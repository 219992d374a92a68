"""Shared fixtures: the app in process (no socket; tests/inprocess.py), real uvicorn
servers on 127.0.0.1 (in a thread, or as a subprocess), and the reference computation the
server's answers are compared with, bit for bit. The tiers (docs/testing.md): ``make
test-fast`` runs the tests marked neither ``slow`` nor ``socket``; ``make test`` runs all.
"""

from __future__ import annotations

import inspect
import os
import re
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

from loadtest.front_nginx import NGINX
from loadtest.servers import free_port, start_actserve, wait_ready
from service import dtypes
from service.engine.activations import Registry
from service.engine.job import Mode
from service.engine.reference import reference as lone_reference
from service.http.app import create_app
from service.http.server import DrainingServer, uvicorn_config
from service.settings import Settings

from .inprocess import InProcess, in_process

# Fusion (service/engine/fusion.py) compiles every registered custom activation with
# torch.compile, seconds of CPU each; the servers of the tests run eager unless a test asks
# for fusion (tests/test_fusion.py). The product default is "request" (exact by default).
os.environ.setdefault("ACTSERVE_FUSION", "off")
# The product imports what torch's first gradient needs before readiness (sympy, seconds of
# CPU, service/engine/engine.py: _warm_autograd); test servers skip it (a gradient test pays
# it once per process instead). tests/test_engine_protocol.py checks the warm-up itself.
os.environ.setdefault("ACTSERVE_WARM_AUTOGRAD", "false")
ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = 1  # the server's default; the reference must use the same count
torch.set_num_threads(TORCH_THREADS)
REGISTRY = Registry()
# The fast tier (``make test-fast``) sets this: a real server started there means a test
# that needs a socket was not marked ``socket`` (see ``pytest_collection_modifyitems``).
NO_SOCKETS = os.environ.get("ACTSERVE_TEST_TIER") == "fast"

# Tests that run Debian's nginx; in CI (.ci/run installs it) a missing nginx fails them instead.
needs_nginx = pytest.mark.skipif(NGINX is None and os.environ.get("CI") != "true",
                                 reason="nginx is not installed (.ci/run installs Debian's)")


def _no_socket_here(what: str) -> None:
    if NO_SOCKETS:
        pytest.fail(f"{what} in the fast tier: mark the test `socket` (docs/testing.md)",
                    pytrace=False)


class ThreadServer:
    """A real uvicorn server for one app, on 127.0.0.1, run in a background thread."""

    def __init__(self, settings: Settings) -> None:
        _no_socket_here("a real server (conftest.serve)")
        self.app = create_app(settings)
        self.services = self.app.state.services
        self.engine = self.services.engine
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, settings, log_level="warning")
        self.server = DrainingServer(config)  # the production server class
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


@pytest.fixture(scope="session")
def app() -> Iterator[InProcess]:
    """One shared app with default settings, in process (no socket), for request-level tests
    that change no server state."""
    with in_process() as a:
        yield a


@pytest.fixture()
def app_client(app) -> Iterator[httpx.Client]:
    with app.client() as c:
        yield c


@contextmanager
def subprocess_server(env_overrides: dict | None = None, port: int | None = None):
    """``python -m service serve`` as a child process (``loadtest.servers.start_actserve``,
    log level info as by default); yields (process, url) once it is ready. The server's
    output so far: ``proc.log_path.read_text()``."""
    _no_socket_here("a server process (conftest.subprocess_server)")
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


# What makes a test ``socket``: its body, or a fixture it uses, starts a real server, a
# child process or a socket. Helpers that hide it are marked by hand; the fast tier fails a
# test that starts a server without the mark (``_no_socket_here``).
_SOCKET_FIXTURES = {"server", "client"}  # conftest's shared real server and its client
_SOCKET_CALLS = re.compile(r"\b(serve|subprocess_server|start_actserve|start_reference|"
                           r"ThreadServer)\(|\bsubprocess\.|\bsocket\.|\bPopen\(")
_source_cache: dict[object, bool] = {}


def _starts_something(func) -> bool:
    if func not in _source_cache:
        try:
            source = inspect.getsource(func)
        except (OSError, TypeError):
            source = ""
        _source_cache[func] = bool(_SOCKET_CALLS.search(source))
    return _source_cache[func]


def _needs_socket(item) -> bool:
    if _SOCKET_FIXTURES & set(item.fixturenames):
        return True
    if _starts_something(getattr(item, "function", None)):
        return True
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in item.fixturenames:
        for fixturedef in defs.get(name, ()):
            if fixturedef.baseid and _starts_something(fixturedef.func):
                return True  # a fixture of the test's own module or package
    return False


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """``socket`` on the tests that start servers or processes (the fast tier leaves them
    out); ``gpu`` tests skip cleanly where CUDA is absent. Under pytest-xdist (``make
    test``) the files with ``slow`` tests go first, then those with ``socket`` ones: each
    worker takes whole files in this order, so the long ones start early and the short
    ones fill the gaps instead of one worker finishing a long file alone at the end."""
    for item in items:
        if "socket" not in item.keywords and _needs_socket(item):
            item.add_marker(pytest.mark.socket)
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        weight: dict[str, int] = {}
        for item in items:
            w = 0 if "slow" in item.keywords else 1 if "socket" in item.keywords else 2
            weight[item.path] = min(weight.get(item.path, 2), w)
        items.sort(key=lambda item: weight[item.path])  # stable: a file keeps its order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
