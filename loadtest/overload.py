"""The overload bench (``make bench BENCH_ARGS=--groups=overload`` or
``python -m loadtest.overload``): an open-loop generator — requests are sent on schedule
whatever the answers, each on an idle keep-alive connection or a new one — against one
actserve child on 127.0.0.1, at 0.5x, 1x, 2x, 5x and 10x of the capacity measured first
(closed loop, the same request), with client deadlines (``timeout`` in the query and the
same budget on the client's clock). Per step: goodput (200s within the deadline per
second), p50/p99 of the 200s, p99 of refusals, refusals by reason, late 200s, the
slowest /readyz on the API port and on the probe port (``probe_port``, a new connection
each time, as an orchestrator asks; both timed from a process of their own,
``probe_timer.py``), the server's RSS and the generator's own CPU (near 100 % of its
cores, a step measures the generator as much as the server), what reached the server (the
generator keeps at most ``--max-conns`` connections: a request due while all are busy is
never sent), the server's CPU and how it split between serving and refusing (``cpu_split``)
and the server's overload refusals by stage (its ``actserve_overload_refusals_total``).
``--front nginx`` sends the load through nginx as the overload front end
(``front_nginx.py``); ``--front-follow`` has ``scripts/nginx_limits.py`` keep its limits at
what the server measures (each step records the limits in force at its end). Writes
``overload.json``, ``overload.md`` and ``overload.png`` (goodput vs offered load). Every run is bounded in
time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from scripts import nginx_limits
from service.observability.front_limits import LARGE_BYTES

from . import servers
from .cpu import tree_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
STEPS = (0.5, 1.0, 2.0, 5.0, 10.0)
MAX_CONNS = 1500  # the generator's connections at most (--max-conns)


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


_TOTAL = re.compile(rb"total;dur=([0-9.]+)")
_ERROR_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')


class _Wire(asyncio.Protocol):
    """One keep-alive connection, at most one request outstanding on it; reads just
    enough of each answer: the status, Content-Length, Connection and the error type."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due: float | None = None  # the outstanding request's scheduled time
        self.first: float | None = None  # when the outstanding answer's first bytes came
        self.held_body = False  # its head sent with Expect, its body held for a 100
        self.sent = 0  # requests sent on this connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.gen.every.add(self)

    def send(self, due: float) -> None:
        self.due = due
        self.first = None
        self.sent += 1
        # with Expect: 100-continue, the head now and the body on the server's 100
        gen = self.gen
        self.held_body = gen.body is not None
        if gen.stamp_at is None:
            self.transport.write(gen.raw)
        else:  # X-Request-Start: the scheduled time, on the wall clock in microseconds
            self.transport.writelines((gen.raw[:gen.stamp_at], b"X-Request-Start: t=%d\r\n"
                                       % ((due + gen.wall_offset) * 1e6), gen.raw[gen.stamp_at:]))

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.buf += data
        if self.held_body and self.buf.startswith(b"HTTP/1.1 100"):
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.buf[:end + 4]
            self.held_body, self.first = False, None
            self.transport.write(self.gen.body)
            if not self.buf:
                return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.due is None:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        due, self.due = self.due, None
        self.held_body = False  # answered without asking for the body: it is never sent
        reason = ""
        if status != 200:
            m = _ERROR_TYPE.search(body)
            reason = m.group(1).decode() if m else str(status)
        else:
            m = _TOTAL.search(head)
            if m:
                self.gen.server_s.append(float(m.group(1)) / 1000)
            self.gen.first_s.append(self.first - due)
            if self.sent == 1:  # a connection opened for it: its wait to be accepted is in it
                self.gen.opened_ok.append(time.perf_counter() - due)
        if b"connection: close" in head:
            self.transport.close()
        else:
            self.gen.idle.append(self)
        self.gen.done(due, status, reason)

    def connection_lost(self, exc) -> None:
        self.gen.open -= 1
        self.gen.every.discard(self)
        if self in self.gen.idle:
            self.gen.idle.remove(self)
        if self.due is not None:
            due, self.due = self.due, None
            self.gen.done(due, -1, "client_error")


class Generator:
    """Requests on asyncio protocols over at most ``max_conns`` keep-alive connections.
    Every latency is counted from the request's scheduled time (so a generator that falls
    behind shows it, and no omission is coordinated with the server)."""

    def __init__(self, host: str, port: int, raw: bytes, max_conns: int = MAX_CONNS,
                 pool: int | None = None, expect: bool = False, stamp: bool = False) -> None:
        self.host, self.port, self.raw = host, port, raw
        self.body: bytes | None = None  # with ``expect``: sent on the server's 100 only
        if expect:
            head, _, self.body = raw.partition(b"\r\n\r\n")
            self.raw = head + b"\r\nExpect: 100-continue\r\n\r\n"
        # with ``stamp``: each request carries its scheduled time as X-Request-Start, after
        # the request line
        self.stamp_at = raw.find(b"\r\n") + 2 if stamp else None
        self.wall_offset = time.time() - time.perf_counter()
        self.pool = pool
        self.idle: list[_Wire] = []
        self.every: set[_Wire] = set()  # every open connection, busy or idle
        self.open = 0
        self.max_conns = max_conns
        self.out: list = []
        self.server_s: list[float] = []  # Server-Timing totals of the 200s
        self.first_s: list[float] = []  # the 200s' first answer bytes, from scheduled time
        self.opened_ok: list[float] = []  # 200s on connections opened for them: latencies
        self.outstanding = 0
        self._connecting: set[asyncio.Task] = set()
        self.lag = 0.0  # the open loop's worst slip behind its schedule, seconds
        self._again: float | None = None  # closed loop: send again until this time
        self._all_done: asyncio.Event | None = None

    def _send(self, due: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(due)
            return
        if self.open >= self.max_conns:
            self.done(due, -1, "client_no_connection")
            return
        self.open += 1
        task = asyncio.ensure_future(self._connect(due))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, wire = await loop.create_connection(lambda: _Wire(self), self.host, self.port)
        except OSError:
            self.open -= 1
            self.done(due, -1, "client_error")
            return
        wire.send(due)

    def done(self, due: float, status: int, reason: str) -> None:
        now = time.perf_counter()
        self.out.append((due, now - due, status, reason))
        self.outstanding -= 1
        if self._again is not None and now < self._again:
            self._send(now)
        elif self.outstanding == 0 and self._all_done is not None:
            self._all_done.set()

    async def _drain(self, give_up_s: float) -> None:
        if self.outstanding:
            self._all_done = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_done.wait(), give_up_s)
            except asyncio.TimeoutError:
                pass
            self._all_done = None

    async def warm(self, conns: int) -> None:
        """Open ``conns`` idle connections first, each carrying one request, as a client's
        pool in use would be."""
        loop = asyncio.get_running_loop()

        async def one() -> None:
            try:
                _, wire = await loop.create_connection(lambda: _Wire(self), self.host,
                                                       self.port)
            except OSError:
                return
            self.open += 1
            self.idle.append(wire)

        conns = min(conns, self.max_conns) - self.open
        for i in range(0, max(conns, 0), 64):
            await asyncio.gather(*(one() for _ in range(min(64, conns - i))))
        if wires := list(self.idle):
            # one request on each, 64 at a time, answers dropped: a connection the
            # server has not yet accepted when the step starts would count the accept's
            # wait (seconds, on a loop this busy) against the request
            out, self.out = self.out, []
            self.idle.clear()
            for i in range(0, len(wires), 64):
                chunk = wires[i:i + 64]
                self.outstanding += len(chunk)
                self._all_done = asyncio.Event()
                for w in chunk:
                    w.send(time.perf_counter())
                await asyncio.wait_for(self._all_done.wait(), 30)
                self._all_done = None
            self.out = out

    async def open_loop(self, rate: float, seconds: float, deadline_s: float) -> list:
        self.out = []
        # the pool opened and primed first: ``pool`` connections, or (None) about what
        # 100 ms of the schedule needs, more opened as needed
        await self.warm(self.pool if self.pool is not None else int(rate * 0.1) + 32)
        # the step's own answers, not the priming ones
        self.server_s, self.first_s, self.opened_ok = [], [], []
        n = int(rate * seconds)
        start = time.perf_counter() + 0.01
        i = 0
        self.lag = 0.0
        while i < n:
            now = time.perf_counter()
            if i < n and now - (start + i / rate) > self.lag:
                self.lag = now - (start + i / rate)  # how far the generator fell behind
            while i < n and start + i / rate <= now:
                self._send(start + i / rate)
                i += 1
            if i < n:  # at least a millisecond: the loop's timers are no finer, and a
                # shorter sleep would spin the generator's core (what is due meanwhile goes
                # out together, each latency still counted from its own scheduled time)
                await asyncio.sleep(max(0.001, start + i / rate - time.perf_counter()))
        await self._drain(deadline_s + 10)
        out = self.out
        now = time.perf_counter()
        pending = [w for w in self.every if w.due is not None]
        for w in pending:  # never answered: the client gave up
            out.append((w.due, now - w.due, -1, "client_timeout"))
            w.due = None
        return out

    async def closed_loop(self, concurrency: int, seconds: float, deadline_s: float) -> float:
        self.out = []
        await self.warm(concurrency)
        t0 = time.perf_counter()
        self._again = t0 + seconds
        for _ in range(concurrency):
            self._send(t0)
        await asyncio.sleep(seconds)
        self._again = None
        await self._drain(deadline_s + 10)
        ok = sum(1 for r in self.out if r[2] == 200)
        return ok / (time.perf_counter() - t0)

    def close(self) -> None:
        for w in list(self.every):
            w.transport.close()
        self.idle.clear()


class ProbeTimer:
    """``loadtest/probe_timer.py`` in a process of its own for one step: ``GET /readyz``
    every 100 ms on the API port (kept alive) and the probe port (a new connection each
    time), timed there, so the generator's own lag is not counted in the server's answer
    time."""

    def __init__(self, port: int, probe_port: int) -> None:
        argv = [sys.executable, "-m", "loadtest.probe_timer", "--api-port", str(port)]
        if probe_port:
            argv += ["--probe-port", str(probe_port)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def stop(self) -> tuple[list[float], list[float]]:
        """(the API port's times, the probe port's), seconds; raises on a failed probe."""
        out, _ = self.proc.communicate(b"", timeout=120)
        found = json.loads(out.splitlines()[-1])
        if found["error"]:
            raise RuntimeError(f"/readyz: {found['error']}")
        return found["api"], found["probe"]


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
    # what reached the server: not the requests the generator had no connection for (its
    # cap on connections makes the steepest steps partly a closed loop)
    reached = len(results) - reasons.get("client_no_connection", 0)
    return {"offered_per_s": round(offered, 1), "sent": len(results),
            "reached_per_s": round(reached / seconds, 1),
            "goodput_per_s": round(len(good) / seconds, 1), "ok": len(ok),
            "late_200": len(ok) - len(good), "ok_p50_ms": _pct(ok, 50), "ok_p99_ms": _pct(ok, 99),
            "refused": len(refused), "refused_p99_ms": _pct(refused, 99), "reasons": reasons}


_STAGE = re.compile(r'^actserve_overload_refusals_total\{stage="(\w+)"\} (\S+)$', re.M)


def stage_counts(exposition: str) -> dict[str, int]:
    """``actserve_overload_refusals_total`` by stage from a Prometheus exposition."""
    return {m.group(1): int(float(m.group(2))) for m in _STAGE.finditer(exposition)}


def _scrape_stages(url: str) -> dict[str, int]:
    """The server's overload refusals by stage so far (its ``/metrics``: with several
    workers, all of them); empty when it cannot be read."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            return stage_counts(r.read().decode())
    except OSError:
        return {}


# answers the generator made itself: never reached the server, cost it nothing
_CLIENT_SIDE = ("client_no_connection", "client_timeout", "client_error")


def cpu_split(cpu_s: float, wall_s: float, served: int, reasons: dict[str, int],
              served_cpu_s: float | None) -> dict:
    """Where the server's CPU went over a step: its cores in use (``server_cpu_pct``), and,
    with ``served_cpu_s`` (what a served request cost at the capacity measured first), the
    CPU left over per refusal the server made (``refusal_cpu_us``) and that rest's share
    of the step's CPU (``refusing_cpu_share``). The split assumes a served request costs
    what it cost at capacity; a share near ``1 - goodput/capacity`` says the server's cores
    went to refusing, one well under it that they went unused."""
    out: dict = {"server_cpu_pct": round(100 * cpu_s / wall_s) if wall_s > 0 else None,
                 "refusal_cpu_us": None, "refusing_cpu_share": None}
    refused = sum(n for r, n in reasons.items() if r not in _CLIENT_SIDE)
    if served_cpu_s is None or cpu_s <= 0:
        return out
    rest = max(0.0, cpu_s - served * served_cpu_s)
    out["refusing_cpu_share"] = round(rest / cpu_s, 2) if refused else 0.0
    if refused:
        out["refusal_cpu_us"] = round(rest / refused * 1e6, 1)
    return out


async def run_case(child: servers.Child, elements: int, activation: str, seconds: float,
                   deadline_s: float, steps: tuple[float, ...], pool: int | None = None,
                   probe_port: int = 0, front: servers.Child | None = None,
                   expect: bool = False, stamp: bool = False,
                   max_conns: int = MAX_CONNS) -> dict:
    """One request size through the steps (``max_conns``: the generator's connections at
    most); ``front``: a front end the load goes through
    (its ``/readyz`` too), else straight to ``child``; ``expect``: bodies of 100,000 bytes
    and more are sent with ``Expect: 100-continue`` (as curl sends large ones): the body
    only on the server's ``100 Continue``; ``stamp``: every request carries its scheduled
    time as ``X-Request-Start``."""
    port = int((front or child).url.rsplit(":", 1)[1])
    x = np.random.default_rng(7).standard_normal(elements).astype("<f4").tobytes()
    path = (f"/v1/activations/{activation}?shape={elements}&dtype=float32"
            f"&timeout={deadline_s:g}")
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
           f"octet-stream\r\nContent-Length: {len(x)}\r\n\r\n").encode() + x
    expect = expect and len(x) >= LARGE_BYTES
    gen = Generator("127.0.0.1", port, raw, expect=expect, stamp=stamp)
    await gen.closed_loop(8, 1.0, deadline_s)  # warm: the service model measures
    cpu0 = tree_cpu_seconds(child.proc.pid)
    capacity = await gen.closed_loop(32, seconds, deadline_s)
    served = sum(1 for r in gen.out if r[2] == 200)
    # the server's CPU per request it served at capacity (nothing refused there)
    served_cpu_s = (tree_cpu_seconds(child.proc.pid) - cpu0) / served if served else None
    gen.close()
    await asyncio.sleep(1.0)
    rows = []
    for m in steps:
        gen = Generator("127.0.0.1", port, raw, max_conns=max_conns, pool=pool, expect=expect,
                        stamp=stamp)
        timer = ProbeTimer(port, probe_port)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stages0 = await asyncio.to_thread(_scrape_stages, child.url)
        server0 = tree_cpu_seconds(child.proc.pid)
        results = await gen.open_loop(capacity * m, seconds, deadline_s)
        # the generator's own CPU over the step (its drain included): near 100 % of its
        # core, the row measures the generator as much as the server
        wall = time.perf_counter() - wall0
        client_cpu = (time.process_time() - cpu0) / wall
        server_cpu = tree_cpu_seconds(child.proc.pid) - server0
        worst, probe_worst = await asyncio.to_thread(timer.stop)
        row = summarize(results, seconds, deadline_s, capacity * m)
        row.update(cpu_split(server_cpu, wall, row["ok"], row["reasons"], served_cpu_s))
        stages = await asyncio.to_thread(_scrape_stages, child.url)
        # where the server made the step's overload refusals (the later, the dearer)
        row["refused_by_stage"] = {k: n - stages0.get(k, 0) for k, n in stages.items()
                                   if n > stages0.get(k, 0)}
        row.update(server_total_p50_ms=_pct(gen.server_s, 50),
                   server_total_p99_ms=_pct(gen.server_s, 99),
                   ok_first_byte_p50_ms=_pct(gen.first_s, 50),
                   ok_first_byte_p99_ms=_pct(gen.first_s, 99),
                   # late 200s that were the first request on a connection opened for them
                   # (their wait to be accepted in them), against all late 200s
                   late_200_new_connection=sum(1 for t in gen.opened_ok if t > deadline_s))
        if front is not None:  # the limits nginx has in force at the step's end, and the
            # server's measured ones (the keeper reloads nginx when they differ by 25 %)
            row["front_limits"] = nginx_limits.read(front.log.parent / "limits.conf")
            row["server_front_limits"] = nginx_limits.wanted(
                nginx_limits.fetch(child.url + "/v1/stats"))
        row.update(multiple=m, client_lag_ms=round(gen.lag * 1000, 1),
                   client_cpu_pct=round(client_cpu * 100),
                   readyz_max_ms=_pct(worst, 100), probe_port_readyz_max_ms=_pct(probe_worst, 100),
                   rss_mib=round(_rss(child) / 2**20, 1))
        rows.append(row)
        print(f"  {elements} x{m:g}: {row}", flush=True)
        gen.close()
        await asyncio.sleep(2.0)  # drain between steps
    return {"elements": elements, "activation": activation, "expect": expect, "stamp": stamp,
            "capacity_per_s": round(capacity, 1),
            "served_cpu_us": round(served_cpu_s * 1e6, 1) if served_cpu_s else None,
            "steps": rows}


def _front(meta: dict) -> str:
    if meta.get("front", "none") == "none":
        return ""
    if meta.get("front_follow"):
        return (f", through {meta['front']} (limits kept at the server's measured rate by "
                f"scripts/nginx_limits.py, {meta['front_conns']} small and "
                f"{meta.get('front_large_conns')} large until measured)")
    return (f", through {meta['front']} (at most {meta['front_conns']} small and "
            f"{meta.get('front_large_conns')} large requests in flight)")


def _markdown(result: dict) -> str:
    lines = []
    for case in result["cases"]:
        lines += [f"\n**{case['elements']} elements, {case['activation']}, workers "
                  f"{result['meta']['workers']}{_front(result['meta'])}"
                  f"{', Expect: 100-continue' if case.get('expect') else ''}"
                  f"{', X-Request-Start trusted' if case.get('stamp') else ''}** (capacity "
                  f"{case['capacity_per_s']} req/s, the server's CPU per served request "
                  f"{case.get('served_cpu_us')} µs)\n",
                  "| offered | req/s | reached the server, x capacity | goodput/s | vs capacity "
                  "| 200 p50 ms | 200 p99 ms | late 200 "
                  "| refusals p99 ms | refusals by reason | /readyz max ms | probe port "
                  "/readyz max ms | RSS MiB | generator CPU % | server CPU % | CPU µs per "
                  "refusal | CPU share refusing | the server's refusals by stage |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        header = len(lines) - 2
        for r in case["steps"]:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"
            lines.append(
                f"| {r['multiple']:g}x | {r['offered_per_s']} | "
                f"{r['reached_per_s'] / max(case['capacity_per_s'], 1e-9):.1f} | "
                f"{r['goodput_per_s']} | "
                f"{r['goodput_per_s'] / max(case['capacity_per_s'], 1e-9):.2f} | {r['ok_p50_ms']} | "
                f"{r['ok_p99_ms']} | {r['late_200']} | {r['refused_p99_ms']} | {reasons} | "
                f"{r['readyz_max_ms']} | {r.get('probe_port_readyz_max_ms')} | {r['rss_mib']} | "
                f"{r.get('client_cpu_pct')} | {r.get('server_cpu_pct')} | "
                f"{r.get('refusal_cpu_us')} | {r.get('refusing_cpu_share')} | "
                f"{', '.join(f'{k} {v}' for k, v in r.get('refused_by_stage', {}).items()) or '-'} |"
                + (f" {r['front_limits']['small']} / {r['front_limits']['large']} |"
                   if r.get("front_limits") else ""))
        if any(r.get("front_limits") for r in case["steps"]):
            lines[header] += " nginx limits small / large |"
            lines[header + 1] += "---|"
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


def _cpus(text: str) -> set[int]:
    """``0``, ``0-3``, ``0,2``: a set of core numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _split_cpus(server: str | None, client: str | None) -> tuple[set[int] | None, set[int] | None]:
    """The server on one half of the cores, the generator on the other, so the generator's
    own work is not taken from the server (a generator on the server's cores measures
    itself). With one core, both share it."""
    mine = sorted(os.sched_getaffinity(0))
    if server is None and client is None and len(mine) < 2:
        return None, None
    half = max(1, len(mine) // 2)
    s = _cpus(server) if server else set(mine[:half])
    c = _cpus(client) if client else (set(mine) - s or set(mine))
    return s, c


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per step")
    p.add_argument("--deadline", type=float, default=1.0, help="client deadline, seconds")
    p.add_argument("--sizes", default="1024,262144")
    p.add_argument("--activation", default="gelu")
    p.add_argument("--steps", default=",".join(f"{s:g}" for s in STEPS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--pool", type=int, default=None,
                   help="connections opened and primed before each step (default: about "
                        "what 100 ms of the schedule needs; more are opened as needed, up "
                        "to --max-conns)")
    p.add_argument("--max-conns", type=int, default=MAX_CONNS,
                   help="the generator's connections at most; a request due when all are "
                        "busy is counted client_no_connection and never reaches the server "
                        "(each step reports what reached it)")
    p.add_argument("--server-cpus", default=None,
                   help="cores for the server, e.g. 0 or 0-1 (default: the first half of "
                        "this process's cores when it has two or more, else all)")
    p.add_argument("--client-cpus", default=None,
                   help="cores for the generator (default: the other half)")
    p.add_argument("--front-cpus", default=None,
                   help="with --front: cores for the front end (default: the server's, as in "
                        "a pod)")
    p.add_argument("--expect", action="store_true",
                   help="send bodies of 100,000 bytes and more with Expect: 100-continue, "
                        "the body only on the server's 100 (as curl does)")
    p.add_argument("--stamp", action="store_true",
                   help="every request carries its scheduled time as X-Request-Start, and the "
                        "server trusts it (trust_request_start): deadlines count from the "
                        "client's clock")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an actserve setting for the server (repeatable)")
    p.add_argument("--front", choices=("none", "nginx"), default="none",
                   help="nginx: the load goes through nginx on the server's cores, which "
                        "passes at most --front-conns (--front-large-conns) requests at once "
                        "and answers the rest 503 itself (loadtest/front_nginx.py)")
    p.add_argument("--front-conns", type=int, default=128,
                   help="with --front nginx: requests with bodies under 100,000 bytes in "
                        "flight to the server at most")
    p.add_argument("--front-large-conns", type=int, default=16,
                   help="with --front nginx: requests with larger bodies in flight at most")
    p.add_argument("--front-follow", action="store_true",
                   help="with --front nginx: scripts/nginx_limits.py keeps both limits at "
                        "the server's measured rate x front_delay_ms (/v1/stats), the two "
                        "above only until it has measured")
    a = p.parse_args(argv)
    out = a.out or ROOT / "loadtest" / "reports" / time.strftime("overload-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    probe_port = servers.free_port()  # /readyz also asked there, as an orchestrator would
    settings = {"workers": a.workers, "metrics": True, "probe_port": probe_port}
    if a.stamp:
        settings["trust_request_start"] = True
    for item in a.set:
        k, _, v = item.partition("=")
        settings[k] = v
    steps = tuple(float(s) for s in a.steps.split(","))
    server_cpus, client_cpus = _split_cpus(a.server_cpus, a.client_cpus)
    child = servers.start_actserve("actserve-overload", out / "logs", settings,
                                   cpus=server_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    fronted = a.front != "none"
    result = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": a.workers,
                       "pool": a.pool, "max_conns": a.max_conns, "front": a.front,
                       "front_conns": a.front_conns if fronted else None,
                       "front_large_conns": a.front_large_conns if fronted else None,
                       "front_follow": fronted and a.front_follow,
                       "front_cpus": a.front_cpus if fronted else None,
                       "server_cpus": sorted(server_cpus or os.sched_getaffinity(0)),
                       "client_cpus": sorted(client_cpus or os.sched_getaffinity(0)),
                       "settings": settings, "seconds": a.seconds, "deadline_s": a.deadline},
              "cases": []}
    with servers.running([child]):
        front: list[servers.Child] = []
        if a.front == "nginx":  # on the server's cores; started once the server is ready
            from . import front_nginx

            front = front_nginx.start(out / "nginx", child.url.removeprefix("http://"),
                                      a.front_conns, a.front_large_conns,
                                      _cpus(a.front_cpus) if a.front_cpus else server_cpus,
                                      child.url + "/v1/stats" if a.front_follow else None)
        try:
            for size in (int(s) for s in a.sizes.split(",")):
                result["cases"].append(_run(run_case(child, size, a.activation, a.seconds,
                                                     a.deadline, steps, a.pool, probe_port,
                                                     front[0] if front else None,
                                                     a.expect, a.stamp, a.max_conns)))
        finally:
            for c in reversed(front):
                c.stop()
        if a.front_follow and front:  # the limits nginx was reloaded with, in order
            result["meta"]["front_reloads"] = [
                line for line in front[-1].output().splitlines() if "reloaded" in line]
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
