"""The overload bench (``make bench BENCH_ARGS=--groups=overload`` or
``python -m loadtest.overload``): an open-loop generator — requests are sent on schedule
whatever the answers, each on an idle keep-alive connection or a new one — against one
actserve child on 127.0.0.1, at 0.5x, 1x, 2x, 5x and 10x of the capacity measured first
(closed loop, the same request), with client deadlines (``timeout`` in the query and the
same budget on the client's clock). Per step: goodput (200s within the deadline per
second), p50/p99 of the 200s, p99 of refusals, refusals by reason, late 200s, the
slowest /readyz and the server's RSS. Writes ``overload.json``, ``overload.md`` and
``overload.png`` (goodput vs offered load). Every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from . import servers

ROOT = Path(__file__).resolve().parents[1]
STEPS = (0.5, 1.0, 2.0, 5.0, 10.0)


def _rss(child: servers.Child) -> int:
    """Resident bytes of the server and its children (workers, engine)."""
    total = 0
    pids = [child.proc.pid]
    try:
        kids = Path(f"/proc/{child.proc.pid}/task/{child.proc.pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


async def _exchange(conn: Conn, raw: bytes) -> tuple[int, bytes, bool]:
    conn.writer.write(raw)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "connection" and "close" in v.lower():
            close = True
    body = await conn.reader.readexactly(length) if length else b""
    return status, body, close


class Generator:
    def __init__(self, host: str, port: int, raw: bytes, max_conns: int = 1500) -> None:
        self.host, self.port, self.raw = host, port, raw
        self.idle: list[Conn] = []
        self.open = 0
        self.max_conns = max_conns

    async def _conn(self) -> Conn | None:
        if self.idle:
            return self.idle.pop()
        if self.open >= self.max_conns:
            return None
        self.open += 1
        try:
            r, w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.open -= 1
            return None
        return Conn(r, w)

    async def one(self, deadline_s: float, out: list) -> None:
        t0 = time.perf_counter()
        conn = await self._conn()
        if conn is None:
            out.append((t0, time.perf_counter() - t0, -1, "client_no_connection"))
            return
        try:
            status, body, close = await asyncio.wait_for(_exchange(conn, self.raw),
                                                         deadline_s + 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            self.open -= 1
            conn.writer.close()
            out.append((t0, time.perf_counter() - t0, -1, "client_error"))
            return
        took = time.perf_counter() - t0
        reason = ""
        if status != 200:
            try:
                err = json.loads(body).get("error", {})
                reason = err.get("type", str(status)) if isinstance(err, dict) else str(status)
            except ValueError:
                reason = str(status)
        if close:
            self.open -= 1
            conn.writer.close()
        else:
            self.idle.append(conn)
        out.append((t0, took, status, reason))

    async def open_loop(self, rate: float, seconds: float, deadline_s: float) -> list:
        out: list = []
        tasks = set()
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.ensure_future(self.one(deadline_s, out))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s + 35)
        return out

    async def closed_loop(self, concurrency: int, seconds: float, deadline_s: float) -> float:
        out: list = []
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                await self.one(deadline_s, out)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ok = sum(1 for r in out if r[2] == 200)
        return ok / (time.perf_counter() - t0)

    def close(self) -> None:
        for c in self.idle:
            c.writer.close()
        self.idle.clear()
        self.open = 0


async def _readyz_probe(host: str, port: int, stop: asyncio.Event, worst: list) -> None:
    raw = f"GET /readyz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    r, w = await asyncio.open_connection(host, port)
    conn = Conn(r, w)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            await _exchange(conn, raw)
            worst.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)
    finally:
        w.close()


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarize(results: list, seconds: float, deadline_s: float, offered: float) -> dict:
    ok = [t for _, t, s, _ in results if s == 200]
    good = [t for t in ok if t <= deadline_s]
    refused = [t for _, t, s, _ in results if s != 200]
    reasons: dict[str, int] = {}
    for _, _, s, r in results:
        if s != 200:
            reasons[r] = reasons.get(r, 0) + 1
    return {"offered_per_s": round(offered, 1), "sent": len(results),
            "goodput_per_s": round(len(good) / seconds, 1), "ok": len(ok),
            "late_200": len(ok) - len(good), "ok_p50_ms": _pct(ok, 50), "ok_p99_ms": _pct(ok, 99),
            "refused": len(refused), "refused_p99_ms": _pct(refused, 99), "reasons": reasons}


async def run_case(child: servers.Child, elements: int, activation: str, seconds: float,
                   deadline_s: float, steps: tuple[float, ...]) -> dict:
    port = int(child.url.rsplit(":", 1)[1])
    x = np.random.default_rng(7).standard_normal(elements).astype("<f4").tobytes()
    path = (f"/v1/activations/{activation}?shape={elements}&dtype=float32"
            f"&timeout={deadline_s:g}")
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
           f"octet-stream\r\nContent-Length: {len(x)}\r\n\r\n").encode() + x
    gen = Generator("127.0.0.1", port, raw)
    await gen.closed_loop(8, 1.0, deadline_s)  # warm: the service model measures
    capacity = await gen.closed_loop(32, seconds, deadline_s)
    gen.close()
    await asyncio.sleep(1.0)
    rows = []
    for m in steps:
        gen = Generator("127.0.0.1", port, raw)
        stop, worst = asyncio.Event(), []
        probe = asyncio.ensure_future(_readyz_probe("127.0.0.1", port, stop, worst))
        results = await gen.open_loop(capacity * m, seconds, deadline_s)
        stop.set()
        await asyncio.wait([probe], timeout=5)
        row = summarize(results, seconds, deadline_s, capacity * m)
        row.update(multiple=m, readyz_max_ms=_pct(worst, 100), rss_mib=round(_rss(child) / 2**20, 1))
        rows.append(row)
        print(f"  {elements} x{m:g}: {row}", flush=True)
        gen.close()
        await asyncio.sleep(2.0)  # drain between steps
    return {"elements": elements, "activation": activation, "capacity_per_s": round(capacity, 1),
            "steps": rows}


def _markdown(result: dict) -> str:
    lines = []
    for case in result["cases"]:
        lines += [f"\n**{case['elements']} elements, {case['activation']}, workers "
                  f"{result['meta']['workers']}** (capacity {case['capacity_per_s']} req/s)\n",
                  "| offered | req/s | goodput/s | vs capacity | 200 p50 ms | 200 p99 ms | late 200 "
                  "| refusals p99 ms | refusals by reason | /readyz max ms | RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in case["steps"]:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"
            lines.append(
                f"| {r['multiple']:g}x | {r['offered_per_s']} | {r['goodput_per_s']} | "
                f"{r['goodput_per_s'] / max(case['capacity_per_s'], 1e-9):.2f} | {r['ok_p50_ms']} | "
                f"{r['ok_p99_ms']} | {r['late_200']} | {r['refused_p99_ms']} | {reasons} | "
                f"{r['readyz_max_ms']} | {r['rss_mib']} |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for case in result["cases"]:
        xs = [r["multiple"] for r in case["steps"]]
        ys = [r["goodput_per_s"] / max(case["capacity_per_s"], 1e-9) for r in case["steps"]]
        ax.plot(xs, ys, marker="o", label=f"{case['elements']} elements")
    ax.plot([0.5, 10], [0.5, 1.0], alpha=0)  # keep the scale
    ax.axhline(0.9, ls="--", lw=0.8, color="grey", label="90 % of capacity")
    ax.set_xscale("log")
    ax.set_xlabel("offered load (x measured capacity)")
    ax.set_ylabel("goodput / capacity (200 within 1 s)")
    ax.set_title(f"actserve under overload (workers {result['meta']['workers']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per step")
    p.add_argument("--deadline", type=float, default=1.0, help="client deadline, seconds")
    p.add_argument("--sizes", default="1024,262144")
    p.add_argument("--activation", default="gelu")
    p.add_argument("--steps", default=",".join(f"{s:g}" for s in STEPS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an actserve setting for the server (repeatable)")
    a = p.parse_args(argv)
    out = a.out or ROOT / "loadtest" / "reports" / time.strftime("overload-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"workers": a.workers, "metrics": True}
    for item in a.set:
        k, _, v = item.partition("=")
        settings[k] = v
    steps = tuple(float(s) for s in a.steps.split(","))
    child = servers.start_actserve("actserve-overload", out / "logs", settings)
    result = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": a.workers,
                       "settings": settings, "seconds": a.seconds, "deadline_s": a.deadline},
              "cases": []}
    with servers.running([child]):
        for size in (int(s) for s in a.sizes.split(",")):
            result["cases"].append(asyncio.run(run_case(child, size, a.activation, a.seconds,
                                                        a.deadline, steps)))
    (out / "overload.json").write_text(json.dumps(result, indent=1))
    (out / "overload.md").write_text(_markdown(result))
    try:
        _plot(result, out / "overload.png")
    except ImportError:
        pass
    print((out / "overload.md").read_text())
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
