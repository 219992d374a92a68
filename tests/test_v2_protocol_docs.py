"""The tritonclient examples of docs/v2-protocol.md run against a real server (HTTP and
gRPC), with the documented addresses replaced by the test server's."""

from __future__ import annotations

import re

import pytest

from .conftest import ROOT, free_port, serve

DOC = ROOT / "docs" / "v2-protocol.md"
HTTP, GRPC = "127.0.0.1:8000", "127.0.0.1:8001"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def srv():
    port = free_port()
    with serve(grpc_port=port) as s:
        s.grpc = f"127.0.0.1:{port}"
        yield s


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs(srv, index):
    block = python_blocks()[index]
    assert HTTP in block or GRPC in block, "the example talks to no documented address"
    code = block.replace(GRPC, srv.grpc).replace(HTTP, srv.url.removeprefix("http://"))
    exec(compile(code, f"v2-protocol.md[block {index}]", "exec"), {"__name__": "__doc__"})


def test_the_grpc_and_shared_memory_sections_have_examples():
    joined = "\n".join(python_blocks())
    for needle in ("tritonclient.grpc", "start_stream", "register_system_shared_memory",
                   "set_shared_memory"):
        assert needle in joined, needle
