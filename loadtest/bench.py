"""The benchmark sweep: ``actserve bench`` / ``make bench`` / ``python -m loadtest.bench``.

Starts actserve (its defaults, access log included, and ``--no-metrics``,
``--no-access-log`` and ``max_batch_requests=1`` variants), the HTTP
floor and the naive endpoint as child processes on 127.0.0.1, drives each cell with wrk
(every answer compared with the reference), measures the in-process paths, and writes
``results.json``, ``results.md`` and PNG plots into the output folder. ``--quick`` runs in
well under a minute and is what CI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import (
    bars,
    client_cells,
    cpu,
    engine_hop,
    inprocess,
    lab_bench,
    lab_reports_bench,
    payloads,
    report,
    servers,
    sweep,
    wrk,
)

SEED = 20240611
HOP_JOBS = 1000  # sequential jobs per side of the engine group's in-process hop
ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, req: payloads.Request, timeout: float = 120.0) -> tuple[int, dict, bytes]:
    r = urllib.request.Request(url, data=req.body, headers=req.headers, method="POST")
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class Bodies:
    """One request body per case, its reference answer, and the server's checked answer."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def request(self, case: payloads.Case) -> tuple[payloads.Request, object]:
        if case not in self._cache:
            x = payloads.values(case, SEED)
            self._cache[case] = (payloads.build(case, x), x)
        return self._cache[case]


def check_answer(cell: sweep.Cell, url: str, bodies: Bodies,
                 exact: bool = True) -> tuple[bytes | None, str | None]:
    """Send the cell's request once; return (the answer's bytes, problem or None). The answer
    must equal the CPU reference bit for bit (the floor's must be its constant); with
    ``exact=False`` (a GPU server) close to it."""
    req, x = bodies.request(cell.case)
    status, headers, body = _post(url + req.path, req)
    if status != 200:
        return None, f"HTTP {status}: {body[:300]!r}"
    if cell.server == "floor":
        return body, None if body == b'{"ok":true}' else f"floor answered {body[:80]!r}"
    if cell.server == "echo":
        return body, None if body == req.body else "echo answered other bytes"
    try:
        got = payloads.parse(cell.case, headers, body)
    except (ValueError, KeyError) as exc:
        return None, f"unreadable answer: {exc}"
    want = payloads.expected(cell.case, x)
    problem = payloads.mismatch(cell.case, got, want)
    if problem and not exact and got[1] == want[1]:
        # Another device's kernels may round differently from the CPU reference: accept
        # the answer when it is close; wrk then checks every answer equals this one.
        problem = None if payloads.close(got, want) else problem
    return body, problem


def run_cell(cell: sweep.Cell, url: str, bodies: Bodies, seconds: float,
             exact: bool = True, cpu=None) -> dict:
    """One wrk run; with ``cpu`` (the server's ``cpu_seconds``), also the server's CPU time
    per request (``cpu_us_per_req``): steadier than req/s on a shared machine, since other
    jobs there slow a server down without adding to its CPU time."""
    before = cpu() if cpu else None
    res = _run_cell(cell, url, bodies, seconds, exact)
    after = cpu() if cpu else None
    if before is not None and after is not None and res.get("requests"):
        res["cpu_us_per_req"] = (after - before) / res["requests"] * 1e6
    return res


def _run_cell(cell: sweep.Cell, url: str, bodies: Bodies, seconds: float, exact: bool) -> dict:
    expect, problem = check_answer(cell, url, bodies, exact)
    if problem is not None:
        return {"error": problem}
    req, _ = bodies.request(cell.case)
    res = wrk.run(url + req.path, req.body, req.headers, connections=cell.concurrency,
                  seconds=seconds, expect=expect)
    if res.requests == 0:  # nothing finished in the window (a stalled, shared machine)
        res = wrk.run(url + req.path, req.body, req.headers, connections=cell.concurrency,
                      seconds=2 * seconds, expect=expect)
        return {**res.as_dict(), "retried": True}
    return res.as_dict()


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no run") if runs else "no run"}
    out = {k: statistics.median(r[k] for r in ok)
           for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "mb_per_s")}
    rps = [r["rps"] for r in ok]
    out["runs"] = len(ok)
    out["rps_min"], out["rps_max"] = min(rps), max(rps)
    out["rps_spread_pct"] = (max(rps) - min(rps)) / out["rps"] * 100 if out["rps"] else 0.0
    out["errors"] = sum(r["errors"] for r in ok)
    out["mismatches"] = sum(r["mismatches"] for r in ok)
    out["requests"] = sum(r["requests"] for r in ok)
    for k in ("server_cores", "client_cores", "idle_cores"):  # CpuMeter's figures
        if all(k in r for r in ok):
            out[k] = statistics.median(r[k] for r in ok)
    cpu = [r["cpu_us_per_req"] for r in ok if "cpu_us_per_req" in r]
    if cpu:
        out["cpu_us_per_req"] = statistics.median(cpu)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def measure_inprocess(quick: bool) -> dict:
    secs = 0.3 if quick else 2.0
    big, small = 1 << 20, 1024
    out: dict = {
        "copy_dram": inprocess.copy_bandwidth(secs, 64 << 20),
        "copy_cache": inprocess.copy_bandwidth(secs, big * 4),
        "raw": {}, "executor": {},
    }
    repeats = 1 if quick else 3
    loads = [(small, 1), (big, 1)] + ([] if quick else [(big // 8, 8), (big, 4)])
    raws: dict[int, list[float]] = {small: [], big: []}
    held: list[float] = []
    execs: dict[tuple, list[dict]] = {load: [] for load in loads}
    for _ in range(repeats):  # interleaved repeats: the machine may be shared
        for size in raws:
            raws[size].append(inprocess.raw_torch("relu", size, secs))
        held.append(inprocess.raw_torch("relu", big, secs, held=True))
        for res in inprocess.executor_path("relu", loads, secs):
            execs[(res["size"], res["concurrency"])].append(res)
    for size, rates in raws.items():
        out["raw"][str(size)] = {"elements_per_s": statistics.median(rates), "runs": rates}
    out["raw_held"] = {str(big): {"elements_per_s": statistics.median(held), "runs": held}}
    for (size, conc), runs in execs.items():
        key = str(size) if conc == 1 else f"{size}x{conc}"
        rates = [r["elements_per_s"] for r in runs]
        out["executor"][key] = {"elements_per_s": statistics.median(rates), "runs": rates,
                                "concurrency": conc,
                                "mean_batch_elements": runs[-1]["mean_batch_elements"]}
    # relu is nearly free, so its ratio is all fixed cost; activations with real work:
    out["heavier"] = {}
    for act in ([] if quick else ["gelu", "sigmoid"]):
        raw = inprocess.raw_torch(act, big, secs)
        ex = inprocess.executor_path(act, [(big, 1)], secs)[0]["elements_per_s"]
        out["heavier"][act] = {"raw_elements_per_s": raw, "executor_elements_per_s": ex,
                               "ratio": ex / raw}
    modes = {k: v for k, v in sweep.MODES.items()}
    out["modes"] = inprocess.mode_costs(sweep.MODE_ACTIVATION, sweep.MODE_SIZE if not quick
                                        else 4096, modes, secs)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="actserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 one-second cells (CI smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default loadtest/reports/bench-<time>)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per wrk run (default 3; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each cell the performance bar divides (median quoted)")
    p.add_argument("--groups",
                   default="grid,reference,batching,modes,metrics,accesslog,engine,shm,grpc,"
                           "workers,lab,lab-reports",
                   help="comma-separated subset of grid,reference,batching,modes,metrics,"
                        "accesslog,engine,shm,grpc,workers,lab,lab-reports")
    p.add_argument("--sizes", default=",".join(map(str, sweep.SIZES)))
    p.add_argument("--concurrency", default=",".join(map(str, sweep.CONCURRENCY)))
    p.add_argument("--protocols", default=",".join(sweep.PROTOCOLS))
    p.add_argument("--device", default="cpu",
                   help="ACTSERVE_DEVICE of the servers under test, e.g. cuda:0 (the in-process "
                        "measurements stay on CPU; scripts/gpu_check.sh has the GPU ones)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process measurements")
    p.add_argument("--lab-elements", type=int, default=lab_bench.ELEMENTS,
                   help="elements of the lab group's request (custom vs hand-written)")
    p.add_argument("--lab-reports-rounds", type=int, default=5,
                   help="rounds of the lab-reports group (each cell's median is quoted)")
    p.add_argument("--lab-reports-requests", type=int, default=200,
                   help="requests per cell and round in the lab-reports group")
    p.add_argument("--lab-repeats", type=int, default=lab_bench.REPEATS,
                   help="timed runs of each side in the lab group")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    seconds = a.duration or (1.0 if a.quick else 3.0)
    groups = () if a.quick else tuple(a.groups.split(","))
    if "overload" in groups:  # what a refusal costs, then the open-loop overload bench,
        from . import front_nginx, overload, refusal_cost, refusal_sockets  # the same with
        # deadlines on the client's clock (X-Request-Start), then through nginx in front,
        # its limits following the server (scripts/nginx_limits.py)

        refusal_cost.main([])
        if wrk.available() is not None:  # the same with real sockets, system calls included
            refusal_sockets.main([])
        rc = overload.main(["--out", str(a.out)] if a.out else [])
        if rc == 0:
            rc = overload.main(["--stamp"] + (["--out", str(a.out / "stamped")] if a.out else []))
        if rc == 0 and front_nginx.NGINX is not None:
            rc = overload.main(["--front", "nginx", "--front-follow"] +
                               (["--out", str(a.out / "front-nginx")] if a.out else []))
        return rc
    if a.quick:
        plan = sweep.quick_plan()
    else:
        plan = sweep.full_plan(
            max(1, a.repeats), sizes=[int(s) for s in a.sizes.split(",")],
            concurrency=[int(c) for c in a.concurrency.split(",")],
            protocols=a.protocols.split(","), groups=groups)
    client_groups = tuple(g for g in groups if g in sweep.CLIENT_GROUPS)
    if (plan.cells or client_groups) and wrk.available() is None:
        print(f"actserve bench: {wrk.INSTALL_HINT}", file=sys.stderr)
        return 2
    out = a.out or ROOT / "loadtest" / "reports" / time.strftime("bench-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": a.quick, "seconds": seconds,
        "repeats": max(1, a.repeats) if not a.quick else 1, "commit": git_commit(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "load_before": os.getloadavg(),
        "wrk_threads": 1, "device": a.device, "torch_threads": 1,
    }
    print(f"actserve bench: {len(plan.cells)} cells, {seconds:g}s each, "
          f"{sum(c.repeats for c in plan.cells)} wrk runs -> {out}", flush=True)

    names = plan.servers() + (["actserve-grpc"] if client_groups else [])
    children = []
    for name in names:
        if name in sweep.REFERENCES:
            children.append(servers.start_reference(name, out / "logs"))
        else:
            children.append(servers.start_actserve(name, out / "logs",
                                                   {**sweep.SERVERS[name], "device": a.device}))
    by_name = {c.name: c for c in children}
    bodies = Bodies()
    runs: dict[sweep.Cell, list[dict]] = {c: [] for c in plan.cells}
    with servers.running(children):
        meta["servers_ready_s"] = round(time.time() - started, 1)
        for r, cells in enumerate(plan.rounds()):
            for i, cell in enumerate(cells):
                try:
                    with cpu.CpuMeter(by_name[cell.server].proc.pid) as meter:
                        res = run_cell(cell, by_name[cell.server].url, bodies, seconds,
                                       exact=a.device == "cpu" or cell.server in sweep.REFERENCES,
                                       cpu=by_name[cell.server].cpu_seconds)
                    res.update(meter.result())
                except RuntimeError as exc:
                    res = {"error": str(exc)[:500]}
                runs[cell].append(res)
                cpu_text = (f"  cpu {res['cpu_us_per_req']:6.0f} us/req"
                            if "cpu_us_per_req" in res else "")
                shown = (f"{res['rps']:9.0f} req/s  p50 {res['p50_ms']:8.3f} ms  "
                         f"p99 {res['p99_ms']:8.3f} ms{cpu_text}  cores: server "
                         f"{res['server_cores']:.2f} wrk {res['client_cores']:.2f} idle "
                         f"{res['idle_cores']:.2f}" if "error" not in res
                         else "ERROR " + res["error"][:200])
                print(f"[{r + 1}.{i + 1:>3}/{len(cells)}] {cell.key:<44} {shown}", flush=True)
        client_results = []
        if client_groups:
            grpc_child = by_name["actserve-grpc"]
            client_results = client_cells.measure(
                client_groups, grpc_child.url, grpc_child.grpc_target, seconds,
                max(1, a.repeats), log=lambda line: print(line, flush=True))
        peaks = {c.name: c.rss_peak_bytes() for c in children}
    results_cells = []
    for cell in plan.cells:
        results_cells.append({
            "key": cell.key, "group": cell.group, "server": cell.server,
            "protocol": cell.case.protocol, "activation": cell.case.activation,
            "size": cell.case.size, "concurrency": cell.concurrency, "mode": cell.mode,
            "summary": summarise(runs[cell]), "runs": runs[cell],
        })
    results = {"meta": meta, "cells": results_cells, "server_rss_peak_bytes": peaks,
               "clients": client_results}
    if not a.no_inprocess:
        print("in-process: copy bandwidth, raw torch vs executor path, modes", flush=True)
        t_ip = time.time()
        results["inprocess"] = measure_inprocess(a.quick)
        meta["inprocess_s"] = round(time.time() - t_ip, 1)
    if "engine" in groups:
        print("engine: the hop per batch, in-process (loadtest/engine_hop.py)", flush=True)
        results["engine_hop"] = engine_hop.run(HOP_JOBS)
        print(engine_hop.table(results["engine_hop"], HOP_JOBS, 1024), flush=True)
    if "lab" in groups:
        print(f"lab: custom relu(x) * sigmoid(x) vs hand-written, {a.lab_elements:,} el",
              flush=True)
        t_lab = time.time()
        results["lab"] = lab_bench.measure(a.lab_elements, a.lab_repeats)
        meta["lab_s"] = round(time.time() - t_lab, 1)
    if "lab-reports" in groups:
        print("lab-reports: what gradients and reports cost, two servers side by side",
              flush=True)
        t_lab = time.time()
        results["lab_reports"] = lab_reports_bench.measure(
            rounds=a.lab_reports_rounds, requests=a.lab_reports_requests)
        meta["lab_reports_s"] = round(time.time() - t_lab, 1)
    results["bars"] = bars.evaluate(results)
    meta["load_after"] = os.getloadavg()
    meta["wall_s"] = round(time.time() - started, 1)
    if not a.no_plots:
        results["plots"] = [Path(p).name for p in report.plots(results, out)]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results) + "\n"
                                    + "\n".join(client_cells.markdown(client_results)))
    print(report.bars_table(results["bars"]))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}"
          + (f" and {len(results.get('plots', []))} plots" if not a.no_plots else ""))
    failed = [c["key"] for c in results_cells
              if "error" in c["summary"] or c["summary"].get("mismatches")]
    failed += [f"{c['group']} {c['transport']} c{c['clients']}" for c in client_results
               if "error" in c["summary"] or c["summary"].get("mismatches")]
    if failed:
        print(f"actserve bench: {len(failed)} cells failed or answered wrongly: {failed[:5]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
