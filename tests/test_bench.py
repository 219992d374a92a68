"""The benchmark sweep: wrk's answer check, the bar arithmetic, and the ``--quick`` sweep
end to end (CI runs it once as a smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loadtest import bars, bench, payloads, sweep, wrk

from .conftest import ROOT

NEED_WRK = pytest.mark.skipif(
    wrk.available() is None and not os.environ.get("CI"),
    reason="wrk is not installed (.ci/run installs it; `apt-get install -y wrk`)",
)


def test_wrk_summary_parsing():
    line = ('WRKJSON {"requests":2000,"duration_us":2000000,"bytes":4000000,"connect":0,'
            '"read":1,"write":0,"status":2,"timeout":0,"mismatches":3,"lat_mean_us":900.5,'
            '"lat_max_us":5000,"p50_us":800,"p90_us":1500,"p99_us":3000,"p999_us":4500}')
    r = wrk.parse("Running 2s test\n" + line + "\n")
    assert r.rps == 1000 and r.p50_ms == 0.8 and r.p99_ms == 3.0 and r.errors == 3
    assert r.mismatches == 3 and r.mb_per_s == 2.0
    with pytest.raises(RuntimeError, match="no summary"):
        wrk.parse("nothing here")


@NEED_WRK
def test_wrk_compares_every_answer(server):
    case = payloads.Case(size=512)
    req = payloads.build(case, payloads.values(case, 3))
    url = server.url + req.path
    status, _, good = bench._post(url, req)
    assert status == 200
    right = wrk.run(url, req.body, req.headers, connections=2, seconds=1, expect=good)
    assert right.requests > 0 and right.mismatches == 0 and right.errors == 0
    flipped = bytearray(good)
    flipped[100] ^= 1
    wrong = wrk.run(url, req.body, req.headers, connections=2, seconds=1, expect=bytes(flipped))
    assert wrong.requests > 0 and wrong.mismatches == wrong.requests


def test_missing_wrk_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(wrk, "available", lambda: None)
    assert bench.main(["--quick"]) == 2
    assert "apt-get install -y wrk" in capsys.readouterr().err


def _cell(server, protocol, size, conc, rps, p50, p99):
    return {"server": server, "protocol": protocol, "size": size, "concurrency": conc, "mode": "",
            "summary": {"rps": rps, "p50_ms": p50, "p99_ms": p99}}


def test_bars_are_ratios_of_cells_of_one_run():
    m = 1048576
    results = {"cells": [
        _cell("floor", "native-binary", 1024, 64, 1000, 10, 20),
        _cell("actserve", "native-binary", 1024, 64, 700, 10, 30),
        _cell("actserve", "v2-binary", 1024, 64, 500, 12, 30),
        _cell("naive", "native-json", 1024, 64, 100, 50, 60),
        _cell("actserve", "native-json", 1024, 64, 300, 20, 30),
        _cell("floor", "native-binary", 1024, 1, 3000, 0.30, 1),
        _cell("actserve", "native-binary", 1024, 1, 2000, 0.90, 1),
    ], "inprocess": {"raw": {str(m): {"elements_per_s": 10.0}},
                     "executor": {str(m): {"elements_per_s": 8.0}}}}
    rows = {r["bar"].split(" >=")[0].split(":")[0]: r for r in bars.evaluate(results)}
    assert len(rows) == len(bars.BARS)
    got = {k: (None if r["value"] is None else round(r["value"], 3), r["pass"]) for k, r in rows.items()}
    assert got["native binary 1,024 el, 64 clients"] == (0.7, True)
    assert got["v2 binary 1,024 el, 64 clients"] == (0.5, False)
    assert got["native JSON 1,024 el, 64 clients"] == (3.0, True)
    assert got["binary 1,048,576 el, 8 clients"] == (None, None)
    assert got["1 client, 1,024 el binary"] == (0.6, False)
    assert got["64 clients, 1,024 el binary"] == (3.0, False)
    assert got["executor path, 1,048,576 el per batch"] == (0.8, True)


def test_large_body_bar_also_reports_the_echo_reference():
    m = 1048576
    results = {"cells": [_cell("floor", "native-binary", m, 8, 200, 40, 60),
                         _cell("actserve", "native-binary", m, 8, 100, 80, 120),
                         _cell("echo", "native-binary", m, 8, 125, 64, 90)]}
    row = next(r for r in bars.evaluate(results) if r["bar"].startswith("binary 1,048,576"))
    assert row["value"] == 0.5 and row["pass"] is False
    assert "echo (same bytes back) 125 req/s, actserve 0.80x of it" in row["detail"]


def test_workers_group_pairs_one_and_two_workers_in_the_same_rounds():
    plan = sweep.full_plan(3, groups=("workers",))
    cells = {(c.server, c.case.protocol, c.case.activation, c.case.size, c.concurrency)
             for c in plan.cells}
    assert cells == {(f"actserve-workers{n}", "native-binary", "relu", size, conc)
                     for n in (1, 2) for size, conc in ((1024, 64), (1048576, 8))} | {
        ("actserve-workers2-engine", "native-binary", "relu", 1024, 64)}
    assert all(c.repeats == 3 for c in plan.cells)
    assert [len(r) for r in plan.rounds()] == [5, 5, 5]  # each round runs every server
    assert sweep.SERVERS["actserve-workers2"] == {**sweep.DEFAULTS, "workers": 2}
    m = 1048576
    rows = bars.evaluate({"cells": [
        _cell("actserve-workers1", "native-binary", 1024, 64, 2000, 30, 60),
        _cell("actserve-workers2", "native-binary", 1024, 64, 3000, 20, 40),
        _cell("actserve-workers1", "native-binary", m, 8, 100, 80, 120),
        _cell("actserve-workers2", "native-binary", m, 8, 120, 70, 110)]})
    got = {r["bar"]: (round(r["value"], 2), r["pass"]) for r in rows if r["value"] is not None}
    assert got == {"--workers 2 vs 1, binary 1,024 el, 64 clients >= 1.4 x req/s": (1.5, True),
                   "--workers 2 vs 1, binary 1,048,576 el, 8 clients >= 1.3 x req/s":
                   (1.2, False)}


def test_lab_group_is_wired_into_the_sweep_and_its_bar(tmp_path, capsys):
    from loadtest import lab_bench

    assert "lab" in bench.parse_args([]).groups.split(",")  # part of `make bench`
    assert bench.main(["--groups", "lab", "--lab-elements", "4096", "--lab-repeats", "3",
                       "--no-inprocess", "--no-plots", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cells"] == [] and results["meta"]["lab_s"] >= 0
    lab = results["lab"]
    assert lab["group"] == "lab" and lab["elements"] == 4096
    assert lab["custom_ms"] > 0 and lab["hand_ms"] > 0
    row = next(r for r in results["bars"] if r["bar"].startswith("lab:"))
    assert row["limit"] == lab_bench.BAR
    assert row["value"] == pytest.approx(lab["custom_ms"] / lab["hand_ms"])
    assert row["pass"] == (row["value"] <= lab_bench.BAR)
    md = (tmp_path / "results.md").read_text()
    assert "## Lab: a custom activation vs the hand-written composition" in md
    assert "4,096 float32 elements" in md and "lab: custom relu(x)" in md
    # a run without the group leaves the bar unmeasured
    rows = bars.evaluate({"cells": []})
    assert next(r for r in rows if r["bar"].startswith("lab:"))["value"] is None


def test_lab_reports_group_compares_two_servers_in_one_run(tmp_path):
    from loadtest import lab_reports_bench

    assert "lab-reports" in bench.parse_args([]).groups.split(",")
    assert bench.main(["--groups", "lab-reports", "--lab-reports-rounds", "1",
                       "--lab-reports-requests", "20", "--no-inprocess", "--no-plots",
                       "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rep = results["lab_reports"]
    for cell in ("plain_default_ms", "plain_profile_allowed_ms", "numerics_ms", "grad_ms"):
        assert rep[cell] > 0, cell
    assert rep["allowed_vs_default"] == pytest.approx(
        rep["plain_profile_allowed_ms"] / rep["plain_default_ms"], rel=1e-2)
    row = next(r for r in results["bars"] if r["bar"].startswith("lab reports:"))
    assert row["limit"] == lab_reports_bench.BAR and row["value"] == rep["allowed_vs_default"]
    assert "## Lab: what gradients and reports cost" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@NEED_WRK
def test_quick_sweep_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loadtest.bench", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["cells"]
    assert len(cells) >= 10
    assert {c["server"] for c in cells} == {"actserve", "actserve-nometrics", "actserve-batch1",
                                            "actserve-noaccesslog", "floor", "naive", "echo"}
    assert {c["protocol"] for c in cells if c["server"] == "actserve"} == set(payloads.PROTOCOLS)
    for c in cells:
        s = c["summary"]
        assert "error" not in s, (c["key"], s)
        assert s["rps"] > 0 and s["requests"] > 0 and s["mismatches"] == 0, c["key"]
        assert s["p50_ms"] <= s["p99_ms"]
    evaluated = [b for b in results["bars"] if b["value"] is not None]
    assert len(evaluated) >= 6
    ip = results["inprocess"]
    assert ip["copy_dram"]["copy_GBps"] > 0 and ip["raw"]["1048576"]["elements_per_s"] > 0
    assert ip["modes"]["inplace"]["allocated_bytes"] < ip["modes"]["float32"]["allocated_bytes"]
    assert sorted(results["plots"]) == ["batching.png", "latency_throughput.png", "metrics.png",
                                        "modes.png"]
    for name in results["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "## Performance bar" in md and "![modes](modes.png)" in md
    assert "## Access log: defaults (on) vs off" in md
    assert all(c["summary"]["cpu_us_per_req"] > 0 for c in cells if c["server"].startswith("actserve"))
    access = next(b for b in results["bars"] if b["bar"].startswith("access log on"))
    assert access["value"] is not None  # both sides measured in the same run
    # the default server really logged (one line per request), the other not at all
    logs = {p.stem: p.read_text() for p in (tmp_path / "logs").glob("actserve*.log")}
    assert logs["actserve"].count('"path":"/v1/activations/relu"') > 100
    assert '"path":' not in logs["actserve-noaccesslog"]


def test_profile_summary_folds_py_spy_stacks():
    from loadtest.profile_summary import fold

    raw = ["Runner.run (asyncio/runners.py:118);handle (service/http/exchange.py:40);"
           "decode (service/codecs/native.py:60) 3\n",
           "Runner.run (asyncio/runners.py:118);handle (service/http/exchange.py:41) 1\n",
           "Thread.run (threading.py:982);_main (service/engine/executor.py:93) 5\n"]
    n, totals = fold(raw, "Runner.run")
    assert n == 4
    assert totals["handle [exchange.py]"] == 4 and totals["decode [native.py]"] == 3
    assert fold(raw)[0] == 9


def test_actserve_bench_cli_reaches_the_sweep_from_anywhere(tmp_path):
    exe = ROOT / ".venv" / "bin" / "actserve"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "service"]
    proc = subprocess.run([*argv, "bench", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--device" in proc.stdout
