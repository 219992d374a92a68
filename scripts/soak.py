"""Soak test: moderate load for a bounded time against a server process this script starts
(or one given with --url and --pid), sampling its memory, open file descriptors and threads.
Exits non-zero on any error or growth beyond the stated bounds.

    python -m scripts.soak --duration 600        # make soak
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest import servers

ROOT = Path(__file__).resolve().parents[1]

PAYLOADS = [(name, n) for name in ("relu", "gelu", "silu", "sigmoid", "leaky_relu")
            for n in (1024, 16_384, 131_072)]


def proc_figures(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def start_server() -> servers.Child:
    logs = Path(tempfile.mkdtemp(prefix="actserve-soak-"))
    child = servers.start_actserve("actserve", logs)
    try:
        servers.wait_ready(child.proc, child.url + "/readyz", 60, "actserve", child.output)
    except RuntimeError as exc:
        child.stop()
        raise SystemExit(str(exc)) from exc
    print(f"server log: {child.log}")
    return child


async def worker(c: httpx.AsyncClient, stop: float, seed: int, stats: dict) -> None:
    rng = np.random.default_rng(seed)
    expected: dict[tuple, bytes] = {}
    while time.monotonic() < stop:
        name, n = PAYLOADS[rng.integers(len(PAYLOADS))]
        x = np.random.default_rng(n).standard_normal(n).astype("<f4")
        t0 = time.perf_counter()
        try:
            r = await c.post(f"/v1/activations/{name}", params={"shape": str(n)},
                             content=x.tobytes(),
                             headers={"content-type": "application/octet-stream"})
        except httpx.HTTPError as exc:
            stats["errors"].append(repr(exc))
            continue
        stats["latency"].append(time.perf_counter() - t0)
        if r.status_code != 200:
            stats["errors"].append(f"{r.status_code} {r.text[:100]}")
            continue
        key = (name, n)
        if name == "relu" and r.content != np.maximum(x, 0).tobytes():
            stats["errors"].append("relu result differs from max(x, 0)")
        if expected.setdefault(key, r.content) != r.content:
            stats["errors"].append(f"{key}: answer changed between requests")
        stats["requests"] += 1


async def soak(url: str, pid: int, duration: float, clients: int, sample_s: float) -> dict:
    stats = {"requests": 0, "errors": [], "latency": []}
    samples = []
    stop = time.monotonic() + duration
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        tasks = [asyncio.create_task(worker(c, stop, i, stats)) for i in range(clients)]
        while time.monotonic() < stop:
            samples.append((time.monotonic(), proc_figures(pid)))
            await asyncio.sleep(min(sample_s, max(0.0, stop - time.monotonic())))
        await asyncio.gather(*tasks)
    samples.append((time.monotonic(), proc_figures(pid)))
    return {"stats": stats, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sample", type=float, default=10.0)
    p.add_argument("--url")
    p.add_argument("--pid", type=int)
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    args = p.parse_args(argv)
    child = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        child = start_server()
        url, pid = child.url, child.proc.pid
    try:
        result = asyncio.run(soak(url, pid, args.duration, args.clients, args.sample))
    finally:
        if child is not None:
            child.stop(grace_s=60)
    stats, samples = result["stats"], result["samples"]
    warm = samples[min(1, len(samples) - 1)][1]  # after the first interval: caches warm
    last = samples[-1][1]
    lat = sorted(stats["latency"]) or [0.0]
    growth = last["rss_mib"] - warm["rss_mib"]
    print(f"soak: {args.duration:.0f} s, {args.clients} clients, {stats['requests']} requests "
          f"({stats['requests'] / args.duration:.0f}/s), {len(stats['errors'])} errors")
    print(f"latency ms: p50 {statistics.median(lat) * 1000:.2f}, "
          f"p99 {lat[int(len(lat) * 0.99) - 1] * 1000:.2f}, max {lat[-1] * 1000:.2f}")
    print(f"server RSS MiB: start {samples[0][1]['rss_mib']:.1f}, after warm-up "
          f"{warm['rss_mib']:.1f}, end {last['rss_mib']:.1f} (growth {growth:+.1f}, bound "
          f"{args.max_rss_growth_mib})")
    print(f"fds: {warm['fds']} -> {last['fds']}; threads: {warm['threads']} -> {last['threads']}")
    for e in stats["errors"][:5]:
        print("error:", e)
    ok = (not stats["errors"] and growth <= args.max_rss_growth_mib
          and last["fds"] <= warm["fds"] + 4 and last["threads"] <= warm["threads"])
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
