"""``make loadtest``: a headless, time-bounded Locust run with CSV and HTML reports.

Starts an actserve server on a free 127.0.0.1 port unless ``--host`` names one, runs Locust
(``loadtest/locustfile.py``) headless for ``--run-time``, writes ``locust_*.csv``
(``locust_final_*.csv`` hold the complete figures) and ``report.html`` under
``loadtest/reports/<run>/``, prints a progress line every ``--progress-s`` seconds while it
runs, then a summary: requests, failures, throughput and latency per request kind, and,
counted apart (they are not requests), where the server's time went (Server-Timing phases,
also added to ``report.html``). The totals of the summary and of the HTML report are the
requests actually sent. Exits non-zero when any request failed (an error status or a wrong
answer).

Options after ``--`` go to Locust unchanged, e.g. ``-- --act-sizes 1048576``.
"""

from __future__ import annotations

import argparse
import csv
import html
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
    p.add_argument("--progress-s", type=float, default=5.0,
                   help="seconds between progress lines (0: none)")
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
    """A text summary of the final CSVs; returns (text, requests, failures). Requests and
    Server-Timing phases are separate tables: only requests count as requests."""
    rows = _read_csv(out / "locust_final_stats.csv")
    head = (f"{'type':<6} {'name':<22} {'reqs':>7} {'fails':>6} {'req/s':>8} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    lines = ["Requests", head]
    reqs = fails = 0
    total = None
    for r in rows:
        row = (f"{r['Type']:<6} {r['Name']:<22} {r['Request Count']:>7} "
               f"{r['Failure Count']:>6} {float(r['Requests/s']):>8.1f} {r['50%']:>8} "
               f"{r['95%']:>8} {r['99%']:>8}")
        if r["Name"] == "Aggregated":
            total = row
            continue
        lines.append(row)
        reqs += int(r["Request Count"])
        fails += int(r["Failure Count"])
    if total is not None:
        lines.append(total)
    phases = timing_rows(out)
    if phases:
        lines += ["", "Server-Timing phases (one sample per answered request; not requests)",
                  f"{'phase':<10} {'count':>7} {'avg ms':>8} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'p99 ms':>8} {'max ms':>8}"]
        for r in phases:
            lines.append(f"{r['Phase']:<10} {r['Count']:>7} {float(r['Average ms']):>8.3f} "
                         f"{r['50%']:>8} {r['95%']:>8} {r['99%']:>8} {float(r['Max ms']):>8.3f}")
    failures = out / "locust_final_failures.csv"
    if failures.exists():
        for r in _read_csv(failures)[:5]:
            lines.append(f"failure x{r['Occurrences']}: {r['Name']}: {r['Error'][:160]}")
    return "\n".join(lines), reqs, fails


def timing_rows(out: Path) -> list[dict]:
    path = out / "locust_final_server_timing.csv"
    return _read_csv(path) if path.exists() else []


def add_timing_to_report(report: Path, rows: list[dict]) -> None:
    """Append the Server-Timing phases to Locust's HTML report, as a table of their own."""
    if not rows or not report.exists():
        return
    cells = "".join(
        f"<tr><td>{html.escape(r['Phase'])}</td><td>{int(r['Count'])}</td>"
        f"<td>{float(r['Average ms']):.3f}</td><td>{html.escape(r['50%'])}</td>"
        f"<td>{html.escape(r['95%'])}</td><td>{html.escape(r['99%'])}</td>"
        f"<td>{float(r['Max ms']):.3f}</td></tr>" for r in rows)
    section = (
        '<section id="server-timing" style="font-family:sans-serif;margin:2em">'
        "<h2>Server-Timing phases</h2><p>Where the server's time went, one sample per answered "
        "request. These are not requests: the totals above count only requests sent.</p>"
        "<table border=1 cellpadding=4><tr><th>phase</th><th>count</th><th>avg ms</th>"
        f"<th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th></tr>{cells}</table>"
        "</section>")
    text = report.read_text()
    at = text.rfind("</body>")
    report.write_text(text[:at] + section + text[at:] if at >= 0 else text + section)


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
                   "--act-progress-s", str(a.progress_s), *extra]
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
    add_timing_to_report(out / "report.html", timing_rows(out))
    text, reqs, fails = summary(out)
    print(text)
    seconds = _seconds(a.run_time)
    rate = f" ({reqs / seconds:.1f} req/s over {seconds:g} s)" if seconds else ""
    print(f"\n{reqs} requests{rate}, {fails} failures against {host}; reports in {out}")
    if fails or reqs == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
