"""``make loadtest``: a headless, time-bounded Locust run with CSV and HTML reports.

Starts an actserve server on a free 127.0.0.1 port unless ``--host`` names one, runs Locust
(``loadtest/locustfile.py``) headless for ``--run-time``, writes ``locust_*.csv``
(``locust_final_*.csv`` hold the complete figures) and ``report.html`` under
``loadtest/reports/<run>/``, and prints a summary: requests, failures,
throughput and latency per request kind, and where the server's time went (Server-Timing).
Exits non-zero when any request failed (an error status or a wrong answer).

Options after ``--`` go to Locust unchanged, e.g. ``-- --act-sizes 1048576``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from . import servers

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loadtest.run_locust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="a running server (default: start one)")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=8.0)
    p.add_argument("--run-time", default="30s", help="Locust --run-time (e.g. 20s, 2m)")
    p.add_argument("--out", type=Path, help="report folder (default loadtest/reports/locust-<time>)")
    p.add_argument("--server-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="ACTSERVE_* setting for the started server, e.g. max_batch_requests=1")
    p.add_argument("locust_args", nargs=argparse.REMAINDER,
                   help="after --: passed to Locust (e.g. --act-protocols native-json)")
    return p.parse_args(argv)


def _seconds(run_time: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    total, num = 0.0, ""
    for ch in run_time.strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
    return total + (float(num) if num else 0.0)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summary(out: Path) -> tuple[str, int, int]:
    """A text summary of ``locust_stats.csv``; returns (text, requests, failures)."""
    rows = _read_csv(out / "locust_final_stats.csv")
    lines = [f"{'type':<14} {'name':<22} {'reqs':>7} {'fails':>6} {'req/s':>8} "
             f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
    reqs = fails = 0
    for r in rows:
        if r["Name"] == "Aggregated":
            continue
        lines.append(f"{r['Type']:<14} {r['Name']:<22} {r['Request Count']:>7} "
                     f"{r['Failure Count']:>6} {float(r['Requests/s']):>8.1f} {r['50%']:>8} "
                     f"{r['95%']:>8} {r['99%']:>8}")
        if r["Type"] != "server-timing":
            reqs += int(r["Request Count"])
            fails += int(r["Failure Count"])
    failures = out / "locust_final_failures.csv"
    if failures.exists():
        for r in _read_csv(failures)[:5]:
            lines.append(f"failure x{r['Occurrences']}: {r['Name']}: {r['Error'][:160]}")
    return "\n".join(lines), reqs, fails


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = a.out or ROOT / "loadtest" / "reports" / time.strftime("locust-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    child = None
    host = a.host
    if host is None:
        settings = dict(s.split("=", 1) for s in a.server_setting)
        child = servers.start_actserve("actserve", out / "logs", settings)
        host = child.url
    extra = [x for x in a.locust_args if x != "--"]
    argv_locust = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
                   "--headless", "--host", host, "-u", str(a.users), "-r", str(a.spawn_rate),
                   "--run-time", a.run_time, "--stop-timeout", "5", "--csv", str(out / "locust"),
                   "--html", str(out / "report.html"), "--only-summary", "--loglevel", "WARNING",
                   *extra]
    limit = _seconds(a.run_time) + 90
    try:
        if child is not None:
            with servers.running([child]):
                proc = subprocess.run(argv_locust, cwd=ROOT, timeout=limit)
        else:
            proc = subprocess.run(argv_locust, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"loadtest: Locust did not finish within {limit:.0f}s", file=sys.stderr)
        return 3
    if not (out / "locust_final_stats.csv").exists():
        print(f"loadtest: Locust wrote no statistics (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode or 3
    text, reqs, fails = summary(out)
    print(text)
    print(f"\n{reqs} requests, {fails} failures against {host}; reports in {out}")
    if fails or reqs == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
