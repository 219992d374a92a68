"""The client stands on its own: it imports and works where torch cannot be imported, and
its distribution depends on numpy and httpx only."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

NO_TORCH = r'''
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the torch blocker does not work")

import asyncio

import numpy as np

import actserve_client as ac

url = sys.argv[1]
with ac.Client(url) as c:
    c.wait_until_ready(30)
    assert c.activate("relu", np.array([-1.0, 2.0], np.float32)).tolist() == [0.0, 2.0]
    assert c.activate("leaky_relu", [[-1.0, 3.0]], negative_slope=0.5) == [[-0.5, 3.0]]
    half = c.activate("sigmoid", np.zeros((2, 2), np.float16))
    assert half.dtype == np.float16 and half.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    bf = c.activate("sigmoid", np.zeros(3, np.float32), compute_dtype="bfloat16")
    assert bf.dtype.name == "bfloat16" and bf.astype(np.float32).tolist() == [0.5] * 3
    assert "gelu" in c.activations()
    try:
        c.activate("nope", [1.0])
    except ac.NotFoundError as exc:
        assert exc.status == 404
    else:
        raise SystemExit("no NotFoundError")


async def main():
    async with ac.AsyncClient(url) as c:
        return await c.activate_many("relu", [[-1.0], [1.0]])

assert asyncio.run(main()) == [[0.0], [1.0]]
try:
    import actserve_client.torch  # noqa: F401
except ImportError as exc:
    assert "needs torch" in str(exc), exc
else:
    raise SystemExit("actserve_client.torch imported without torch")
assert "torch" not in sys.modules, "something imported torch"
print("NO-TORCH-OK")
'''


def test_client_imports_and_works_without_torch(server, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    proc = subprocess.run([sys.executable, str(script), server.url], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO-TORCH-OK" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building the wheel offline needs setuptools in the environment")
def test_distribution_depends_on_numpy_and_httpx_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "clients" / "python", src,
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("actserve_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
    tops = {Path(n).parts[0] for n in names}
    assert "actserve_client" in tops
    assert all(t == "actserve_client" or t.endswith(".dist-info") for t in tops), tops
    assert "actserve_client/py.typed" in names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    always = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires
                    if "extra ==" not in r)
    assert always == ["httpx", "numpy"], requires
    assert any(r.startswith("torch") and 'extra == "torch"' in r for r in requires)
    assert not any(n.startswith("service/") for n in names)
