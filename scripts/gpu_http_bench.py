"""Short end-to-end benchmark over HTTP: the same requests against a CUDA server and a CPU
server, started side by side, with a threaded Python load generator (no wrk needed).

Prints a markdown table: requests/s, p50/p99 latency, and the server's own queue and
compute medians (from ``Server-Timing``), per device, wire dtype, AMP, size and clients.
Each cell runs ``--seconds`` (default 2). Servers are ``loadtest.servers`` children on
127.0.0.1, stopped by PID.

    python -m scripts.gpu_http_bench                 # cuda:0 vs cpu
    python -m scripts.gpu_http_bench --devices cpu   # a dry run without a GPU
    python -m scripts.gpu_http_bench --devices cuda:0 --workers 1,4,8   # workers in front of
                                                     # the CUDA engine process
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest import servers
from service import dtypes

ROOT = Path(__file__).resolve().parents[1]

ACTIVATION = "gelu"


def _timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            out[name] = float(rest)
    return out


def run_cell(url: str, size: int, wire: str, amp: bool, clients: int, seconds: float) -> dict:
    body = dtypes.from_float(np.random.default_rng(size).standard_normal(size), wire).tobytes()
    params = {"shape": str(size), "dtype": wire}
    headers = {"content-type": "application/octet-stream"}
    if amp:
        params["amp"] = "true"
    lat: list[float] = []
    queue: list[float] = []
    compute: list[float] = []
    errors: list[str] = []
    start = threading.Event()
    lock = threading.Lock()
    stop_at = [0.0]

    def worker() -> None:
        mine, q, c = [], [], []
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post(f"/v1/activations/{ACTIVATION}", params=params, content=body,
                        headers=headers)  # warm-up, also checks the request is accepted
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                r = client.post(f"/v1/activations/{ACTIVATION}", params=params, content=body,
                                headers=headers)
                mine.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    break
                t = _timing(r.headers.get("server-timing", ""))
                q.append(t.get("queue", 0.0))
                c.append(t.get("compute", 0.0))
        with lock:
            lat.extend(mine)
            queue.extend(q)
            compute.extend(c)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let every client connect and warm up before the clock starts
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors or not lat:
        return {"error": errors[0] if errors else "no requests"}
    lat.sort()
    return {"rps": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "queue_ms": statistics.median(queue), "compute_ms": statistics.median(compute),
            "MBps": len(lat) * len(body) / elapsed / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cuda:0,cpu")
    p.add_argument("--workers", default="1",
                   help="comma-separated --workers values; each device runs a server per value")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--clients", default="1,16")
    a = p.parse_args(argv)
    devices = [dev if w == "1" else f"{dev} w{w}" for dev in a.devices.split(",")
               for w in a.workers.split(",")]
    clients = [int(c) for c in a.clients.split(",")]
    cases = [(1024, "float32", False), (1 << 20, "float32", False), (1 << 20, "float16", False),
             (1 << 20, "bfloat16", False), (1 << 20, "float32", True)]
    logs = Path(tempfile.mkdtemp(prefix="actserve-gpu-http-"))
    def settings(name: str) -> dict:
        dev, _, w = name.partition(" w")
        return {"device": dev, **({"workers": int(w)} if w else {})}

    children = [servers.start_actserve(dev, logs, settings(dev)) for dev in devices]
    with servers.running(children):
        urls = {c.name: c.url for c in children}
        print(f"activation {ACTIVATION}, binary native API, {a.seconds:g} s per cell, "
              f"Python threaded clients; queue/compute are the server's Server-Timing medians")
        print("| device | size | wire dtype | amp | clients | req/s | MB/s in | p50 ms | p99 ms "
              "| queue ms | compute ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for size, wire, amp in cases:
            for dev in devices:
                if dev.startswith("cpu") and (wire != "float32" or amp) and size > 1024:
                    continue  # the CPU's dtype/amp costs are in the main sweep
                for n in clients:
                    r = run_cell(urls[dev], size, wire, amp, n, a.seconds)
                    if "error" in r:
                        print(f"| {dev} | {size:,} | {wire} | {amp} | {n} | error: {r['error']} |")
                        continue
                    print(f"| {dev} | {size:,} | {wire} | {amp} | {n} | {r['rps']:.0f} | "
                          f"{r['MBps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                          f"{r['queue_ms']:.3f} | {r['compute_ms']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
