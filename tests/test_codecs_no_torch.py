"""The codec package is torch-free: importing it (every module of it) in a fresh
interpreter leaves ``torch`` out of ``sys.modules``. The import contract (``lint-imports``,
pyproject.toml) checks the same statically; this checks what really gets imported."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import service.codecs

ROOT = Path(__file__).resolve().parents[1]
CODEC_MODULES = sorted(f"service.codecs.{m.name}" for m in pkgutil.iter_modules(service.codecs.__path__))

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                  "loaded": [n for n in sys.argv[1:] if n in sys.modules]}))
"""


def test_every_codec_module_is_listed():
    assert {"service.codecs.base", "service.codecs.native", "service.codecs.v2"} <= set(CODEC_MODULES)


def test_importing_the_codecs_leaves_torch_out():
    out = subprocess.run([sys.executable, "-c", PROBE, "service.codecs", *CODEC_MODULES],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(out.stdout)
    assert seen["loaded"] == ["service.codecs", *CODEC_MODULES]
    assert seen["torch"] == []


def test_the_probe_would_see_torch():
    """The same probe on a module that does import torch reports it (the check can fail)."""
    out = subprocess.run([sys.executable, "-c", PROBE, "service.engine.compute"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "torch" in json.loads(out.stdout)["torch"]
