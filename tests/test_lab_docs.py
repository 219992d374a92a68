"""docs/lab.md: every Python block runs, in order, against a real server, and prints the
article's values (SDK: register, activate with expr, RemoteActivation on a custom name)."""

from __future__ import annotations

import contextlib
import io

from .conftest import ROOT, serve
from .test_client_readme import DOC_URL, python_blocks

LAB = ROOT / "docs" / "lab.md"


def test_every_lab_block_runs_and_prints_the_articles_values():
    out = io.StringIO()
    blocks = python_blocks(LAB.read_text())
    assert len(blocks) == 5
    with serve() as srv:
        for i, block in enumerate(blocks):
            assert DOC_URL in block
            code = block.replace(DOC_URL, srv.url)
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"lab.md[block {i}]", "exec"), {"__name__": "__lab__"})
    printed = out.getvalue()
    for line in ("lab_relu [0.0, 0.0, 1.0, 2.0]", "lab_leaky [-0.01, 0.0, 1.0, 2.0]",
                 "lab_sigmoid [0.2689, 0.5, 0.7311, 0.8808]",
                 "lab_tanh [-0.7616, 0.0, 0.7616, 0.964]",
                 "lab_elu [-0.6321, 0.0, 1.0, 2.0]", "gate [0.0, 0.0, 0.7311, 1.7616]",
                 "model (2, 4) torch.float32",
                 "article CustomLayer (3, 4, 5) True", "(x if x > 0.0 else (alpha * (exp(x) - 1.0))) True"):
        assert line in printed, (line, printed)
    assert "leaky 0.1 [-0.1" in printed
    assert "409" in printed and "400" in printed and "column 5" in printed


def test_sdk_register_unregister_and_inline_sync_and_async():
    import asyncio

    import numpy as np
    import pytest
    from actserve_client import AsyncClient, BadRequestError, Client, NotFoundError

    from service.engine import custom
    from service.engine.reference import reference
    from service.engine.selftest import sample

    from .conftest import same_bits

    x = sample(1000, "float32", 2)
    lone = custom.build({"name": "g", "expr": "relu(x) * sigmoid(x)"})
    expected = reference(lone, (), x, "float32")[0]
    with serve() as srv, Client(srv.url) as client:
        info = client.register("sdk_gate", "relu(x)*sigmoid(x)")
        assert info.custom and info.formula == "(relu(x) * sigmoid(x))"
        assert client.activations()["sdk_gate"].custom
        for protocol in ("v2", "v2-json", "native", "native-json"):
            # JSON carries NaN as a token (no sign or payload): equal values, NaN for NaN
            same = same_bits if "json" not in protocol else (
                lambda a, b: a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True))
            assert same(client.activate("sdk_gate", x, protocol=protocol), expected)
            got = client.activate("expr", x, expr="relu(x) * sigmoid(x)", protocol=protocol)
            assert same(got, expected)
        client.unregister("sdk_gate")
        with pytest.raises(NotFoundError):
            client.activate("sdk_gate", x)
        with pytest.raises(BadRequestError, match="built in"):
            client.unregister("relu")
        with pytest.raises(BadRequestError, match="unknown name 'q'"):
            client.activate("expr", x, expr="x * q")

        async def run():
            async with AsyncClient(srv.url) as ac:
                await ac.register("sdk_async", "x * 2")
                y = await ac.activate("sdk_async", np.array([1.5], np.float32))
                await ac.unregister("sdk_async")
                return y

        assert asyncio.run(run()).tolist() == [3.0]


def test_lab_bench_measures_both_sides_on_the_compute_path():
    from loadtest import lab_bench

    res = lab_bench.measure(elements=4096, repeats=3)
    assert res["group"] == "lab" and res["elements"] == 4096
    assert res["custom_ms"] > 0 and res["hand_ms"] > 0
    assert res["passed"] == (res["custom_ms"] / res["hand_ms"] <= lab_bench.BAR) or \
        abs(res["ratio"] - lab_bench.BAR) < 0.01
