"""Every Python block of the client's user guide runs, in order, against a real server."""

from __future__ import annotations

import contextlib
import io
import re

from .conftest import ROOT

GUIDE = ROOT / "clients" / "python" / "README.md"
DOC_URL = "http://127.0.0.1:8000"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_guide_has_examples_for_every_part():
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) >= 7
    joined = "\n".join(blocks)
    for needle in ("activate_many", "AsyncClient", "RemoteActivation", "NotFoundError",
                   "compute_dtype", "activations()", "bfloat16", "outputs=["):
        assert needle in joined, needle


def test_every_python_block_runs(server):
    out = io.StringIO()
    for i, block in enumerate(python_blocks(GUIDE.read_text())):
        assert DOC_URL in block, f"block {i} does not talk to the documented server"
        code = block.replace(DOC_URL, server.url)
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), {"__name__": "__guide__"})
    printed = out.getvalue()
    assert "[0.0, 1.0]" in printed  # the async example's print
    assert "404" in printed  # the error example reached the server
