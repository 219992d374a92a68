"""Settings: env prefix, CLI over env, and a bad value stops start-up naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.cli import load_settings
from service.settings import Settings

from .conftest import ROOT


def test_env_prefix_and_cli_override(monkeypatch):
    monkeypatch.setenv("ACTSERVE_MAX_BATCH_REQUESTS", "7")
    monkeypatch.setenv("ACTSERVE_PORT", "9001")
    s = load_settings({"port": 9002, "device": None})
    assert s.max_batch_requests == 7 and s.port == 9002 and s.device == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"device": "tpu"}, "is not a device"),
        ({"max_batch_requests": 0}, "max_batch_requests"),
        ({"max_batch_requests": 10, "max_queue_requests": 5}, "ACTSERVE_MAX_QUEUE_REQUESTS"),
        ({"log_level": "loud"}, "log_level"),
    ],
)
def test_bad_values_name_the_setting(kwargs, words):
    with pytest.raises(ValidationError) as info:
        Settings(**kwargs)
    assert words in str(info.value)


def test_bad_env_value_stops_startup_with_a_message():
    env = {**os.environ, "ACTSERVE_MAX_BATCH_ELEMENTS": "-3"}
    proc = subprocess.run([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "max_batch_elements (ACTSERVE_MAX_BATCH_ELEMENTS)" in proc.stderr


def test_cuda_device_without_cuda_stops_startup():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--device", "cuda",
                           "--grpc-port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr


_MALLOC_PROBE = """
import resource, sys
from service import malloc_tuning
applied = malloc_tuning.tune(int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def burst():  # eight 4 MiB buffers alive at once, then all freed: a busy server's pattern
    bufs = [bytearray(4 << 20) for _ in range(8)]
    del bufs
for _ in range(3):
    burst()
before = faults()
for _ in range(10):
    burst()
print(applied, (faults() - before) / 80)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_keep_mib_reuses_warm_pages_for_large_buffers():
    """With the default setting a 4 MiB buffer reuses freed pages (no page faults); with
    0 (glibc's own defaults) the freed heap is trimmed and each buffer faults ~1,000 pages."""
    def probe(keep: int) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, str(keep)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        applied, per_buffer = out.split()
        return applied, float(per_buffer)

    applied, tuned = probe(Settings().malloc_keep_mib)
    if applied != "True":
        pytest.skip("no glibc mallopt here")
    assert tuned < 10
    untouched, faulting = probe(0)
    assert untouched == "False" and faulting > 500
