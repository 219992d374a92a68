"""docs/lab.md: every Python block runs, in order, against a real server, and prints the
article's values (SDK: register, activate with expr, RemoteActivation on a custom name)."""

from __future__ import annotations

import contextlib
import io

import pytest

from .conftest import ROOT, serve
from .test_client_readme import DOC_URL, python_blocks

LAB = ROOT / "docs" / "lab.md"
PART2 = "## Gradients, numerics and profiles"


def _run_blocks(blocks: list[str], url: str) -> str:
    out = io.StringIO()
    for i, block in enumerate(blocks):
        assert DOC_URL in block
        code = block.replace(DOC_URL, url)
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"lab.md[block {i}]", "exec"), {"__name__": "__lab__"})
    return out.getvalue()


def test_every_lab_block_runs_and_prints_the_articles_values():
    blocks = python_blocks(LAB.read_text().split(PART2)[0])
    assert len(blocks) == 5
    with serve() as srv:
        printed = _run_blocks(blocks, srv.url)
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
    # the ratio of the unrounded times (the rounded milliseconds of a 4,096-element run are
    # too coarse to recompute it from)
    assert res["ratio"] == pytest.approx(res["custom_ms"] / res["hand_ms"], rel=0.15)
    assert res["passed"] == (res["ratio"] <= lab_bench.BAR) or \
        abs(res["ratio"] - lab_bench.BAR) < 0.002


def test_gradient_numerics_and_profile_blocks_run():
    blocks = python_blocks(LAB.read_text().split(PART2)[1])
    assert len(blocks) == 3
    with serve(allow_profile=True) as srv:
        printed = _run_blocks(blocks, srv.url)
    for line in ("elu [-0.6321, 0.0, 1.0, 2.0] d/dx [0.3679, 1.0, 1.0, 1.0]",
                 "vjp [0.1839, 0.5, 0.5, 0.5]", "same parameter gradients: True",
                 "float16 sigmoid: float16 max ULP", "rows 12",
                 "profiled on cpu - aten::gelu listed: True", "trace events: True"):
        assert line in printed, (line, printed)


def _cells(table: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows}


def test_the_published_accuracy_tables_match_a_fresh_sweep_where_the_platform_matches():
    """docs/lab.md keeps one table per platform key (CPU capability, ISA features, torch):
    every table covers every built-in activation and dtype and keeps the invariants that hold
    on any CPU; the table of this machine's key, where published, is what a fresh sweep
    computes now. On a CPU with no published table, the fresh sweep keeps the same
    invariants."""
    from loadtest.accuracy_table import END, START, markdown, published, sweep_all, this_platform
    from service.engine.activations import INLINE, Registry

    text = LAB.read_text()
    tables = published(text)
    assert tables and text.count(START) == len(tables) == text.count(END)
    fresh = _cells(markdown(sweep_all()))
    names = {a.name for a in Registry() if a is not INLINE}
    for key, table in [*tables.items(), ("fresh sweep", None)]:
        cells = fresh if table is None else _cells(table)
        assert {name for name, _ in cells} == names, key
        assert {wire for _, wire in cells} == {"float16", "bfloat16", "float32", "float64"}, key
        for (name, wire), row in cells.items():
            assert len(row) == 4, (key, name, wire)
            suffix = {"float16": "f16", "bfloat16": "bf16"}.get(wire)
            if suffix:  # a 16-bit input is answered in its own dtype, AMP or not
                assert all(c.endswith(suffix) for c in row[:3]), (key, name, wire, row)
        for name in names:
            # float64 against itself: exact on every CPU
            assert cells[(name, "float64")][0] == "0 f64", (key, name)
            # float32 computed in float32 never changes an output against float32
            assert cells[(name, "float32")][3].startswith("0 /"), (key, name)
    key = this_platform()["key"]
    if key in tables:
        mine = _cells(tables[key])
        for cell_key, cells in fresh.items():
            assert mine[cell_key] == cells, (key, cell_key, mine[cell_key], cells)
