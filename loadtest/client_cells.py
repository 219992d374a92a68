"""Benchmark cells that wrk cannot drive, run by Python clients in threads (closed loop, a
fixed duration, every answer compared with the reference bit for bit):

* ``shm``: 1,048,576 float32 relu at 8 clients, the SDK over system shared memory
  (``Client(shared_memory="auto")``) beside the SDK's HTTP binary path (v2 binary), same
  server, same run; the performance bar wants shared memory >= 3x the HTTP req/s;
* ``grpc``: 1,024 float32 relu with the stock ``tritonclient.grpc`` beside the stock
  ``tritonclient.http`` (binary), at 1 and 8 clients (reported, no bar).

The client code runs in this process, so both sides of each pair pay the same Python
client costs and differ only in how the tensor travels.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

SHM_SIZE, SHM_CLIENTS = 1 << 20, 8
GRPC_SIZE, GRPC_CLIENTS = 1024, (1, 8)
# (group, transport, size, clients)
CELLS = (
    [("shm", "sdk-shm", SHM_SIZE, SHM_CLIENTS), ("shm", "sdk-http", SHM_SIZE, SHM_CLIENTS)]
    + [("grpc", t, GRPC_SIZE, c) for c in GRPC_CLIENTS for t in ("tritonclient-grpc",
                                                                  "tritonclient-http")]
)


def _caller(transport: str, http_url: str, grpc_target: str | None,
            x: np.ndarray) -> tuple[Callable[[], np.ndarray], Callable[[], None]]:
    """(one request -> its answer, close) for one client thread."""
    if transport.startswith("sdk"):
        from actserve_client import Client

        mode = "auto" if transport == "sdk-shm" else "off"
        client = Client(http_url, shared_memory=mode, timeout=120)
        return (lambda: client.activate("relu", x)), client.close
    if transport == "tritonclient-grpc":
        import tritonclient.grpc as tg

        client = tg.InferenceServerClient(grpc_target)
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return (lambda: client.infer("relu", [inp]).as_numpy("output")), client.close
    import tritonclient.http as th

    client = th.InferenceServerClient(http_url.removeprefix("http://"))
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return (lambda: client.infer("relu", [inp]).as_numpy("output")), client.close


def run(transport: str, http_url: str, grpc_target: str | None, size: int, clients: int,
        seconds: float) -> dict:
    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    want = np.maximum(x, np.float32(0)).tobytes()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    problems = {"errors": 0, "mismatches": 0}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call, close = _caller(transport, http_url, grpc_target, x)
        try:
            if call().tobytes() != want:  # warm-up (and the SDK's probe) off the clock
                with lock:
                    problems["mismatches"] += 1
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    ok = call().tobytes() == want
                except Exception:
                    with lock:
                        problems["errors"] += 1
                    continue
                latencies[i].append(time.perf_counter() - t)
                if not ok:
                    with lock:
                        problems["mismatches"] += 1
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600  # set for real once every client is warm
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for t in threads:
        t.join(seconds + 300)
    wall = time.perf_counter() - began
    lat = sorted(v for per in latencies for v in per)
    if not lat:
        return {"error": f"no request finished ({problems})"}

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000

    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "mean_ms": statistics.fmean(lat) * 1000,
            "mb_per_s": len(lat) * x.nbytes * 2 / wall / 1e6, **problems}


def measure(groups: tuple[str, ...], http_url: str, grpc_target: str, seconds: float,
            repeats: int, log=print) -> list[dict]:
    """Every cell of ``groups``, ``repeats`` times in rounds; medians in ``summary``."""
    cells = [c for c in CELLS if c[0] in groups]
    runs: dict[tuple, list[dict]] = {c: [] for c in cells}
    for r in range(repeats):
        for cell in cells:
            group, transport, size, clients = cell
            try:
                res = run(transport, http_url, grpc_target, size, clients, seconds)
            except Exception as exc:  # a cell that cannot run is reported, not fatal
                res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            runs[cell].append(res)
            shown = (f"{res['rps']:9.0f} req/s  p50 {res['p50_ms']:8.3f} ms" if "error" not in res
                     else "ERROR " + res["error"])
            log(f"[{r + 1}] {group:<5} {transport:<18} {size:>8} c{clients:<3} {shown}")
    out = []
    for cell, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        summary = ({k: statistics.median(r[k] for r in ok)
                    for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "mb_per_s")}
                   if ok else {"error": rs[0]["error"]})
        if ok:
            summary.update(runs=len(ok), errors=sum(r["errors"] for r in ok),
                           mismatches=sum(r["mismatches"] for r in ok),
                           requests=sum(r["requests"] for r in ok))
        group, transport, size, clients = cell
        out.append({"group": group, "transport": transport, "size": size, "clients": clients,
                    "summary": summary, "runs": rs})
    return out


def find(cells: list[dict], transport: str, size: int, clients: int) -> dict | None:
    for c in cells:
        if (c["transport"], c["size"], c["clients"]) == (transport, size, clients):
            return None if "error" in c["summary"] else c["summary"]
    return None


def markdown(cells: list[dict]) -> list[str]:
    if not cells:
        return []
    out = ["## Shared memory and gRPC (Python clients in threads)", "",
           "| group | transport | elements | clients | req/s | p50 ms | p99 ms | errors |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        s = c["summary"]
        if "error" in s:
            out.append(f"| {c['group']} | {c['transport']} | {c['size']} | {c['clients']} | "
                       f"error: {s['error'][:80]} | | | |")
            continue
        out.append(f"| {c['group']} | {c['transport']} | {c['size']:,} | {c['clients']} | "
                   f"{s['rps']:.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                   f"{s['errors'] + s['mismatches']} |")
    return [*out, ""]
