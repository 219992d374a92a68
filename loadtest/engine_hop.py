"""What the engine process's hop costs per batch, in-process, without HTTP:

    python -m loadtest.engine_hop [--jobs 3000] [--elements 1024]

Three round trips, each a median over ``--jobs`` sequential jobs (one job per batch):

* ``inline``: ``Engine.submit`` of a relu job and its answer (batcher, compute thread, back);
* ``process``: the same through ``RemoteEngine.submit``: the arena slot, the ``job`` message
  over the Unix socket, the engine process's batcher and compute thread, the ``done``
  message back;
* ``floor``: a 70-byte message and its echo between two processes over a Unix stream socket
  with the same framing and event loop (``channel.Link``, uvloop when
  installed): what any hop costs on this machine before any work is done.

``process - inline`` is the hop's cost per batch; ``floor`` is how much of it the machine
charges for waking two processes. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from service.engine.engine import Engine
from service.engine.ipc import channel
from service.engine.ipc.remote import RemoteEngine
from service.settings import Settings

ECHO = r"""
import asyncio, sys
from service.engine.ipc import channel
try:
    from uvloop import new_event_loop
except ImportError:
    new_event_loop = asyncio.new_event_loop
async def main(path):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    class Echo(channel.Link):
        def __init__(self):
            super().__init__(lambda m: self.send(m),
                             lambda: done.done() or done.set_result(None))
    server = await loop.create_unix_server(Echo, path)
    print("ready", flush=True)
    await done
    server.close()
loop = new_event_loop()
loop.run_until_complete(main(sys.argv[1]))
"""


async def _engine_p50(engine, jobs: int, elements: int) -> float:
    x = np.linspace(-1, 1, elements, dtype=np.float32)
    relu = engine.registry.get("relu")
    times = []
    for _ in range(jobs):
        job = engine.jobs.build(relu, x.copy(), "float32", {}, {}, api="native")
        t0 = time.perf_counter()
        result = await engine.submit(job)
        times.append(time.perf_counter() - t0)
        if result.release is not None:
            result.release()
    return statistics.median(times[jobs // 10:])  # the first tenth warms up


async def _floor_p50(jobs: int) -> float:
    path = os.path.join(tempfile.mkdtemp(prefix="actserve-hop-"), "echo.sock")
    child = subprocess.Popen([sys.executable, "-c", ECHO, path], stdout=subprocess.PIPE,
                             text=True)
    try:
        child.stdout.readline()
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue = asyncio.Queue()
        link = channel.Link(answers.put_nowait, lambda: None)
        await loop.create_unix_connection(lambda: link, path)
        message = ["done", 1, "float32", [1024], 0.0, 1, 1024, "cpu", 0.0, {}, None, None, {}]
        times = []
        for _ in range(jobs):
            t0 = time.perf_counter()
            link.send(message)
            await answers.get()
            times.append(time.perf_counter() - t0)
        link.close()
        return statistics.median(times[jobs // 10:])
    finally:
        child.terminate()
        child.wait(10)


async def measure(jobs: int, elements: int) -> dict:
    out = {}
    inline = Engine(Settings())
    await inline.start()
    try:
        out["inline_us"] = await _engine_p50(inline, jobs, elements) * 1e6
    finally:
        await inline.stop()
    remote = RemoteEngine(Settings(engine="process"))
    await remote.start()
    try:
        out["process_us"] = await _engine_p50(remote, jobs, elements) * 1e6
    finally:
        await remote.stop()
    out["floor_us"] = await _floor_p50(jobs) * 1e6
    out["hop_us"] = out["process_us"] - out["inline_us"]
    return {k: round(v, 1) for k, v in out.items()}


def run(jobs: int = 3000, elements: int = 1024) -> dict:
    """``measure`` on the event loop the server uses (uvloop when installed)."""
    try:
        from uvloop import new_event_loop
    except ImportError:
        new_event_loop = asyncio.new_event_loop
    loop = new_event_loop()
    try:
        return loop.run_until_complete(measure(jobs, elements))
    finally:
        loop.close()


def table(r: dict, jobs: int, elements: int) -> str:
    rows = [f"| round trip, {elements:,} el relu, p50 of {jobs:,} | µs |", "| --- | ---: |"]
    for key, label in (("inline_us", "Engine.submit (inline)"),
                       ("process_us", "RemoteEngine.submit (engine process)"),
                       ("hop_us", "the hop: process - inline"),
                       ("floor_us", "floor: message + echo between two processes")):
        rows.append(f"| {label} | {r[key]:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--elements", type=int, default=1024)
    args = p.parse_args()
    r = run(args.jobs, args.elements)
    print(table(r, args.jobs, args.elements))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
