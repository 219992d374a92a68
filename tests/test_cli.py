"""The command line: ``--version``, and one flag per setting generated from the model, each
with its default and environment variable in ``serve --help``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from pydantic import Field

from service import __version__
from service.cli import build_parser, load_settings
from service.cli_flags import add_settings_flags, overrides, show_default
from service.settings import Settings

from .conftest import ROOT


def _help(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_version():
    assert _help("--version").strip() == f"actserve {__version__}"


def test_serve_help_lists_every_setting_with_its_default_and_env_var():
    text = " ".join(_help("serve", "--help").split())  # argparse wraps lines
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "ACTSERVE_" + name.upper()
        assert re.search(rf"{re.escape(flag)}\b", text), flag
        assert f"(default: {show_default(field.default)}; env {env})" in text, name


def test_flags_override_the_environment_and_none_clears_a_default(monkeypatch):
    monkeypatch.setenv("ACTSERVE_DEFAULT_COMPUTE_DTYPE", "float16")
    monkeypatch.setenv("ACTSERVE_MAX_DELAY_US", "7")
    monkeypatch.setenv("ACTSERVE_METRICS", "true")
    args = build_parser().parse_args(["serve", "--default-compute-dtype", "none", "--no-metrics",
                                      "--log-format", "text", "--port", "9123"])
    s = load_settings(overrides(args))
    assert s.default_compute_dtype is None and s.metrics is False
    assert s.log_format == "text" and s.port == 9123 and s.max_delay_us == 7  # env kept


def test_a_new_setting_is_a_flag_at_once():
    import argparse

    class More(Settings):
        workers_demo: int = Field(3, ge=1, description="a setting added later")

    parser = argparse.ArgumentParser()
    add_settings_flags(parser, More)
    assert "(default: 3; env ACTSERVE_WORKERS_DEMO)" in " ".join(parser.format_help().split())
    assert overrides(parser.parse_args(["--workers-demo", "5"]), More)["workers_demo"] == "5"


@pytest.mark.parametrize(("argv", "words"), [
    (["--port", "http"], "port (ACTSERVE_PORT)"),
    (["--log-format", "xml"], "invalid choice: 'xml'"),
])
def test_bad_flag_values_stop_startup_naming_the_setting(argv, words):
    proc = subprocess.run([sys.executable, "-m", "service", "serve", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr
