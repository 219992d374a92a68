"""Paired A/B of two checkouts on the performance bar's cells: both servers run side by
side, and wrk runs alternate between them (the order flips every pair), so each pair sees
the same load on a shared machine. Reports req/s per pair, the after/before ratio, and the
server's CPU time per request (from /proc, far less sensitive to other processes' load than
req/s). Each checkout's answer is checked against the CPU reference first, and wrk checks
every answer against it.

    git worktree add /tmp/before <commit> && ln -s "$PWD/.venv" /tmp/before/.venv
    python -m scripts.ab_bench --before /tmp/before --after . --pairs 6

The same checkout with one setting changed (the access log on, written to a file as a
container runtime would write the process's output):

    python -m scripts.ab_bench --before . --after . --after-env ACTSERVE_ACCESS_LOG=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

from loadtest import client_cells, payloads, servers, wrk

ROOT = Path(__file__).resolve().parents[1]

CELLS = [("native-binary", 1024, 64), ("v2-binary", 1024, 64),
         ("native-binary", 1 << 20, 8), ("v2-binary", 1 << 20, 8)]
# gRPC unary: the stock tritonclient.grpc in client threads of this process (wrk speaks no
# gRPC; loadtest/client_cells.py), every answer compared with the reference
GRPC_CELLS = [("grpc-unary", 1024, 8)]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(checkout: Path, log: Path,
          extra: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    """(the server process, its HTTP URL, its gRPC target)."""
    port, grpc_port = servers.free_port(), servers.free_port()
    env = {**os.environ, "ACTSERVE_HOST": "127.0.0.1", "ACTSERVE_PORT": str(port),
           "ACTSERVE_GRPC_PORT": str(grpc_port), "ACTSERVE_ACCESS_LOG": "false",
           "ACTSERVE_LOG_LEVEL": "warning", **(extra or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=checkout, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"


def answer(url: str, req: payloads.Request) -> tuple[dict, bytes]:
    r = urllib.request.Request(url + req.path, data=req.body, headers=req.headers)
    with urllib.request.urlopen(r, timeout=60) as resp:
        return dict(resp.headers), resp.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the older commit")
    p.add_argument("--after", type=Path, default=ROOT, help="checkout of the newer commit")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--only", default="", help="comma-separated protocols to run (e.g. "
                   "grpc-unary,native-binary); default: every cell")
    for side in ("before", "after"):
        p.add_argument(f"--{side}-env", action="append", default=[], metavar="KEY=VALUE",
                       help=f"an environment variable of the {side} server (repeatable)")
    a = p.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    sides = {"before": a.before.resolve(), "after": a.after.resolve()}
    extra = {side: dict(kv.split("=", 1) for kv in getattr(a, f"{side}_env")) for side in sides}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    running = {side: start(path, logs / f"ab-{side}.log", extra[side])
               for side, path in sides.items()}
    out: dict = {}
    try:
        for side, (proc, url, _grpc) in running.items():
            servers.wait_ready(proc, url + "/readyz", 120, side)
        for protocol, size, conc in CELLS:
            if only and protocol not in only:
                continue
            case = payloads.Case(size=size, protocol=protocol)
            x = payloads.values(case, 0)
            req = payloads.build(case, x)
            want = payloads.expected(case, x)
            bodies = {}
            for side, (_proc, url, _grpc) in running.items():
                headers, body = answer(url, req)
                problem = payloads.mismatch(case, payloads.parse(case, headers, body), want)
                if problem:
                    raise SystemExit(f"{side} {protocol} {size}: {problem}")
                bodies[side] = body
            rps: dict[str, list[float]] = {s: [] for s in sides}
            cpu: dict[str, list[float]] = {s: [] for s in sides}
            for i in range(a.pairs):
                for side in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                    proc, url, _grpc = running[side]
                    c0 = cpu_s(proc.pid)
                    res = wrk.run(url + req.path, req.body, req.headers, connections=conc,
                                  seconds=a.seconds, expect=bodies[side])
                    if res.errors or res.mismatches:
                        raise SystemExit(f"{side} {protocol} {size}: {res}")
                    rps[side].append(res.rps)
                    cpu[side].append((cpu_s(proc.pid) - c0) / max(1, res.requests) * 1e6)
            key = f"{protocol} {size} el, {conc} clients"
            out[key] = _row(key, rps, cpu, bodies["before"] == bodies["after"])
        for protocol, size, conc in GRPC_CELLS:
            if only and protocol not in only:
                continue
            rps = {s: [] for s in sides}
            cpu = {s: [] for s in sides}
            for i in range(a.pairs):
                for side in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                    proc, url, grpc_target = running[side]
                    c0 = cpu_s(proc.pid)
                    res = client_cells.run("tritonclient-grpc", url, grpc_target, size, conc,
                                           a.seconds)
                    if "error" in res or res["errors"] or res["mismatches"]:
                        raise SystemExit(f"{side} {protocol} {size}: {res}")
                    rps[side].append(res["rps"])
                    cpu[side].append((cpu_s(proc.pid) - c0) / max(1, res["requests"]) * 1e6)
            key = f"{protocol} {size} el, {conc} clients"
            out[key] = _row(key, rps, cpu, True)  # client_cells checks every answer's bits
    finally:
        for proc, _url, _grpc in running.values():
            servers.stop_process(proc)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    return 0


def _row(key: str, rps: dict, cpu: dict, same_bytes: bool) -> dict:
    """Print one table row (medians, the ratio's median and range) and return its figures."""
    ratios = [b / f for b, f in zip(rps["after"], rps["before"], strict=True) if f]
    med = {s: statistics.median(v) for s, v in rps.items()}
    cpu_med = {s: statistics.median(v) for s, v in cpu.items()}
    print(f"| {key} | {med['before']:.0f} | {med['after']:.0f} | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | "
          f"{cpu_med['before']:.0f} | {cpu_med['after']:.0f} | "
          f"{'yes' if same_bytes else 'no'} |", flush=True)
    return {"same_bytes": same_bytes, "rps": rps, "ratios": ratios, "cpu_us_per_request": cpu}


if __name__ == "__main__":
    sys.exit(main())
