"""Paired A/B of two checkouts' latency at a fixed offered load (open loop, below capacity):
both servers run side by side on the same cores, and rounds of the overload bench's
open-loop generator (``loadtest/overload.py``: requests sent on schedule, latency counted
from the scheduled time) alternate between them, the order flipping every pair. Reports
each side's median over rounds of the p50 and p99 of the 200s, and the after/before ratio
of each round (median and range). Where ``ab_bench`` compares throughput in a closed loop,
this compares what a client sees at a load the server can carry.

    git worktree add /tmp/before <commit> && ln -s "$PWD/.venv" /tmp/before/.venv
    python -m scripts.ab_latency --before /tmp/before --after . --rate 1500 --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from loadtest import servers
from loadtest.overload import Generator, _run, _split_cpus
from scripts.ab_bench import start

ROOT = Path(__file__).resolve().parents[1]


def _request(elements: int, activation: str, deadline_s: float) -> bytes:
    x = np.random.default_rng(7).standard_normal(elements).astype("<f4").tobytes()
    path = (f"/v1/activations/{activation}?shape={elements}&dtype=float32"
            f"&timeout={deadline_s:g}")
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
            f"octet-stream\r\nContent-Length: {len(x)}\r\n\r\n").encode() + x


async def _round(port: int, raw: bytes, rate: float, seconds: float, pool: int) -> list[float]:
    """One open-loop round: the 200s' latencies (seconds); raises on any other answer."""
    gen = Generator("127.0.0.1", port, raw, pool=pool)
    try:
        results = await gen.open_loop(rate, seconds, 1.0)
    finally:
        gen.close()
    bad = [(s, r) for _, _, s, r in results if s != 200]
    if bad:
        raise SystemExit(f"port {port}: {len(bad)} answers were not 200 (first {bad[0]}); "
                         f"lower --rate")
    return [t for _, t, _, _ in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the older commit")
    p.add_argument("--after", type=Path, default=ROOT, help="checkout of the newer commit")
    p.add_argument("--rate", type=float, default=1500.0, help="requests a second (below capacity)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds per side")
    p.add_argument("--elements", type=int, default=1024)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--pool", type=int, default=64, help="keep-alive connections per round")
    p.add_argument("--server-cpus", default=None, help="as in loadtest.overload")
    p.add_argument("--client-cpus", default=None, help="as in loadtest.overload")
    a = p.parse_args(argv)
    server_cpus, client_cpus = _split_cpus(a.server_cpus, a.client_cpus)
    sides = {"before": a.before.resolve(), "after": a.after.resolve()}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    running = {side: start(path, logs / f"ab-latency-{side}.log") for side, path in sides.items()}
    if server_cpus:
        for proc, _url, _grpc in running.values():
            os.sched_setaffinity(proc.pid, server_cpus)  # threads made later inherit it
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    raw = _request(a.elements, a.activation, 1.0)
    p50: dict[str, list[float]] = {s: [] for s in sides}
    p99: dict[str, list[float]] = {s: [] for s in sides}
    try:
        for proc, url, _grpc in running.values():
            servers.wait_ready(proc, url + "/readyz", 120, "server")
            if server_cpus:  # every thread, those started before the call above included
                for tid in os.listdir(f"/proc/{proc.pid}/task"):
                    os.sched_setaffinity(int(tid), server_cpus)
        ports = {side: int(url.rsplit(":", 1)[1]) for side, (_p, url, _g) in running.items()}
        for side in sides:  # warm both: first requests, the service model's first measures
            _run(_round(ports[side], raw, a.rate / 4, 1.0, a.pool))
        for i in range(a.rounds):
            for side in (list(sides) if i % 2 == 0 else list(reversed(sides))):
                lat = _run(_round(ports[side], raw, a.rate, a.seconds, a.pool))
                p50[side].append(float(np.percentile(lat, 50)) * 1000)
                p99[side].append(float(np.percentile(lat, 99)) * 1000)
    finally:
        for proc, _url, _grpc in running.values():
            servers.stop_process(proc)
    print(f"{a.elements} elements, {a.activation}, {a.rate:g} req/s open loop, "
          f"{a.rounds} rounds of {a.seconds:g} s per side (ms; ratio after/before)")
    print("| | before | after | ratio (range) |\n|---|---|---|---|")
    for name, values in (("200 p50", p50), ("200 p99", p99)):
        ratios = [x / y for x, y in zip(values["after"], values["before"], strict=True) if y]
        print(f"| {name} | {statistics.median(values['before']):.2f} | "
              f"{statistics.median(values['after']):.2f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}–{max(ratios):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
