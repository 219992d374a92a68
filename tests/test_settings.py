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
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
