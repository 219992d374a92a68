"""Start and stop child servers: actserve and the reference servers, for load runs, the
benchmark, the GPU scripts and the tests (the one way this repository starts a server in a
child process).

Each runs as a child process on 127.0.0.1 on a free port, its output in a log file (a pipe
nobody reads could fill and stall it); ``stop`` ends exactly that child (by its PID) and
waits for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    grpc_target: str | None = None  # host:port of its gRPC listener, when it has one

    def rss_peak_bytes(self) -> int | None:
        """The process's peak resident memory (Linux ``VmHWM``), or None."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process (all its threads) has used, or None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, grace_s: float = 15.0) -> None:
        stop_process(self.proc, grace_s)

    def output(self) -> str:
        """What the child wrote so far (stdout and stderr)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM this child (and only it), wait ``grace_s`` for it to drain, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str,
               output: Callable[[], str] = lambda: "") -> None:
    """Poll ``url`` until it answers 200; fail with the child's output if it exits first,
    or when ``timeout`` passes (the child is left running: the caller stops it)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {output()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready at {url} within {timeout:.0f}s")
        time.sleep(0.05)


def _wait_ready(child: Child, timeout: float) -> None:
    try:
        wait_ready(child.proc, child.url + "/readyz", timeout, child.name, child.output)
    except RuntimeError:
        child.stop()
        raise


def _spawn(name: str, argv: list[str], env: dict, log_dir: Path, port: int,
           cpus: set[int] | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    # ``cpus``: the child and everything it starts run on these cores only
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=pin)
    return Child(name, f"http://127.0.0.1:{port}", proc, log)


def start_actserve(name: str, log_dir: Path, settings: dict | None = None, *,
                   env: dict | None = None, port: int | None = None,
                   cpus: set[int] | None = None) -> Child:
    """``python -m service serve`` with ``ACTSERVE_*`` settings (access log off, log level
    warning unless ``settings`` say otherwise); ``env`` (raw variables) is applied last;
    ``cpus`` pins it (and its workers) to those cores.
    gRPC is off unless the settings say ``grpc_port="free"`` (a free port).
    Not yet ready: pass it to ``running`` (or ``wait_ready``)."""
    port = port or free_port()
    child_env = {**os.environ, "ACTSERVE_HOST": "127.0.0.1", "ACTSERVE_PORT": str(port),
                 "ACTSERVE_ACCESS_LOG": "false", "ACTSERVE_LOG_LEVEL": "warning",
                 "ACTSERVE_GRPC_PORT": "0"}
    settings = dict(settings or {})
    grpc_target = None
    if settings.get("grpc_port") == "free":
        settings["grpc_port"] = free_port()
        grpc_target = f"127.0.0.1:{settings['grpc_port']}"
    for k, v in settings.items():
        child_env[f"ACTSERVE_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    child_env.update(env or {})
    child = _spawn(name, [sys.executable, "-m", "service", "serve"], child_env, log_dir, port,
                   cpus)
    child.grpc_target = grpc_target
    return child


def start_reference(app: str, log_dir: Path) -> Child:
    port = free_port()
    return _spawn(app, [sys.executable, "-m", "loadtest.reference_apps", app, "--port", str(port)],
                  dict(os.environ), log_dir, port)


@contextlib.contextmanager
def running(children: list[Child], timeout: float = 120.0):
    """Wait until every child is ready; stop them all on the way out."""
    try:
        for c in children:
            _wait_ready(c, timeout)
        yield children
    finally:
        for c in children:
            c.stop()
