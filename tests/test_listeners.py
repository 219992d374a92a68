"""The listening ports are checked before anything starts: the HTTP and gRPC ports never
collide silently, and a port another process holds is one line naming it and the flag to
change, not a traceback (``service/listeners.py``, called by ``actserve serve``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from loadtest.servers import free_port
from service import listeners
from service.settings import Settings

from .conftest import ROOT


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACTSERVE_LOG_LEVEL": "warning"})


def test_the_readme_port_with_the_default_grpc_port_is_one_line_naming_both():
    r = _serve("--port", "8001")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "8001" in lines[0] and "--grpc-port" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in r.stderr


def test_a_port_held_by_another_process_is_one_line_naming_its_flag():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        for args, flag in ((("--port", str(busy), "--grpc-port", "0"), "--port"),
                           (("--port", str(free_port()), "--grpc-port", str(busy)), "--grpc-port"),
                           (("--port", str(free_port()), "--grpc-port", "0", "--probe-port",
                             str(busy)), "--probe-port")):
            r = _serve(*args)
            assert r.returncode != 0, args
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
            assert str(busy) in lines[0] and "in use" in lines[0] and flag in lines[0], lines


def test_free_and_distinct_ports_pass_the_check():
    a, b = free_port(), free_port()
    assert listeners.problem(Settings(port=a, grpc_port=b)) is None
    assert listeners.problem(Settings(port=a, grpc_port=0)) is None
    assert listeners.problem(Settings(port=0, grpc_port=0)) is None
    assert "both" in listeners.problem(Settings(port=a, grpc_port=a))
    assert listeners.problem(Settings(port=a, grpc_port=0, probe_port=b)) is None
    for grpc in (0, b):
        same = listeners.problem(Settings(port=a, grpc_port=grpc, probe_port=a))
        assert "probe port and the HTTP port are both" in same and "--probe-port" in same
    assert "probe port and the gRPC port" in listeners.problem(
        Settings(port=a, grpc_port=b, probe_port=b))
