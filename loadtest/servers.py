"""Start and stop the servers a load run talks to: actserve and the reference servers.

Each runs as a child process on 127.0.0.1 on a free port; ``stop`` ends exactly that child
(by its PID) and waits for it.
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

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM this child (and only it), wait ``grace_s`` for it to drain, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.proc.poll() is not None:
            tail = child.log.read_text(errors="replace")[-2000:] if child.log.exists() else ""
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(child.url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"{child.name} did not become ready within {timeout:.0f}s")
        time.sleep(0.1)


def _spawn(name: str, argv: list[str], env: dict, log_dir: Path, port: int) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return Child(name, f"http://127.0.0.1:{port}", proc, log)


def start_actserve(name: str, log_dir: Path, settings: dict | None = None) -> Child:
    """``python -m service serve`` with ``ACTSERVE_*`` settings (access log off)."""
    port = free_port()
    env = {**os.environ, "ACTSERVE_HOST": "127.0.0.1", "ACTSERVE_PORT": str(port),
           "ACTSERVE_ACCESS_LOG": "false", "ACTSERVE_LOG_LEVEL": "warning"}
    for k, v in (settings or {}).items():
        env[f"ACTSERVE_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return _spawn(name, [sys.executable, "-m", "service", "serve"], env, log_dir, port)


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
