"""What the Dockerfile runs, run here without a container: the build stage's files copied
as its COPY lines say, ``scripts/container_install.sh`` into a fresh virtual environment
(the same pip commands; only torch's index differs: the Dockerfile names PyTorch's CPU or
CUDA index, here pip's own configuration finds the CPU build), then the image's
entrypoint, ``scripts/container_entrypoint.sh``, serving from that environment, its
HEALTHCHECK command, and SIGTERM.

Slow (a fresh environment with torch: about a minute); PIP_NO_COMPILE saves the
byte-compilation of torch's sources, which the image build does and this check needn't.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest.servers import free_port

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENTRYPOINT = ROOT / "scripts" / "container_entrypoint.sh"


def build_stage_copies(stage: str) -> list[tuple[list[str], str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    copies = []
    for line in body.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *srcs, dest = line.split()[1:]
            copies.append((srcs, dest))
    return copies


def stage_context(dest_root: Path) -> Path:
    """The build-cpu stage's /src, made from the COPY lines of the Dockerfile."""
    for srcs, dest in build_stage_copies("build-cpu"):
        for src in srcs:
            source = ROOT / src
            if dest.endswith("/"):
                target = dest_root / dest / Path(src).name
            else:
                target = dest_root / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
    return dest_root


def entrypoint_env(venv: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACTSERVE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", ACTSERVE_HOST="127.0.0.1",
               ACTSERVE_PORT=str(port), ACTSERVE_ACCESS_LOG="false", PYTHONUNBUFFERED="1",
               ACTSERVE_GRPC_PORT="0")
    return env


def healthcheck(env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), "healthcheck"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def test_container_install_and_entrypoint_outside_a_container(tmp_path):
    src = stage_context(tmp_path / "src")
    assert (src / "pyproject.toml").is_file() and (src / "service" / "http" / "app.py").is_file()
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=sys.executable, PIP_NO_COMPILE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    t0 = time.monotonic()
    r = subprocess.run(["sh", str(src / "scripts" / "container_install.sh"), str(venv), str(src)],
                       cwd=src, env=env, capture_output=True, text=True, timeout=840)
    install_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "actserve installed: torch" in r.stdout
    print(f"\ncontainer_install.sh: {install_s:.0f} s")
    # The service is installed into the environment (not found in a source folder).
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import service; print(service.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    run_dir = tmp_path / "run"  # neither the repository nor the source copy
    run_dir.mkdir()
    port, probes = free_port(), free_port()
    env = entrypoint_env(venv, port)
    env["ACTSERVE_PROBE_PORT"] = str(probes)  # as in deploy/k8s: the healthcheck asks there
    not_yet = healthcheck(env, run_dir)
    assert not_yet.returncode == 1 and "not ready" in not_yet.stderr

    proc = subprocess.Popen(["sh", str(ENTRYPOINT), "serve", "--log-level", "warning"], env=env,
                            cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while healthcheck(env, run_dir).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        # exec all the way down: the process the container runtime signals is the server.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1].decode() == str(venv / "bin" / "actserve") and b"serve" in cmdline

        url = f"http://127.0.0.1:{port}"
        x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=np.float32)
        answer = httpx.post(url + "/v1/activations/relu", json={"data": x.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"] == np.maximum(x, 0).tolist()
        ready = httpx.get(url + "/readyz", timeout=10).json()
        assert ready == {"status": "ready", "devices": ["cpu"]}
        assert httpx.get(f"http://127.0.0.1:{probes}/readyz", timeout=10).json() == ready

        proc.send_signal(signal.SIGTERM)  # the Dockerfile's STOPSIGNAL
        assert proc.wait(60) == 0
        assert healthcheck(env, run_dir).returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
