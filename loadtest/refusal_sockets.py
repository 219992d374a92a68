"""What a refusal costs with real sockets (``python -m loadtest.refusal_sockets``, part of
``make bench BENCH_ARGS=--groups=overload``).

``refusal_cost.py`` measures the server's own work for a refusal, with no system calls.
This measures what the bound on goodput under overload rests on: the whole cost, the
kernel's receive and send included. The production server class (``DrainingServer`` with
``uvicorn_config``) runs in a thread of this process on the first half of its cores; wrk
(a C client, closed loop, 256 keep-alive connections) runs on the other half and sends
the same native binary request (1,024 float32 elements, ``relu``, ``timeout=10``: a
connection wrk opens can wait in the accept queue, and its first request is dated from
when its bytes came, ``kernel_arrival``; a served request must be served) for a few
seconds a round. Cases, alternating:

* ``served``: computed and answered 200;
* ``refused in the protocol``: refused as soon as its headers are parsed, the engine
  saying every request would be late (``shed.py``, ``Shed.refusal``; the protocol is
  told the server checks API keys, which keeps the raw-bytes path off);
* ``refused unparsed by the engine``: the same refusal made from the raw bytes
  (``Shed.decide``);
* ``refused unparsed``: refused from the raw bytes (``ShedConnection.fast_refusal``), the
  shed held congested with its limit reached, the cheapest answer.

Every request carries a valid API key (the server checks them), so all cases read the
same bytes.

Prints, medians of the rounds: answers a second, this process's CPU microseconds per
answer (user and system), and each case's ratio to a served request. A core that only
refuses answers ``1e6 / µs`` requests a second; with served requests costing ``s`` and
refusals ``r`` CPU seconds, a server offered ``k`` times what it can serve keeps at most
``(1 - k r/s) / (1 - r/s)`` of its capacity (docs/reliability.md, "Cheap refusals").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time

import numpy as np

from service.http.app import create_app
from service.http.server import DrainingServer, uvicorn_config
from service.settings import Settings

from . import servers, wrk
from .refusal_cost import hold_shed

CASES = ("served", "refused in the protocol", "refused unparsed by the engine",
         "refused unparsed")
KEY = "k-refusal-sockets-0123456789"


def _hold(shed, case: str, real: tuple) -> None:
    """The shed's state for ``case`` (``refusal_cost.hold_shed``), and API keys to check
    (so the raw-bytes path is off) for the parsed refusal."""
    hold_shed(shed, case, *real)
    shed.api_keys = [KEY.encode()] if case == "refused in the protocol" else []


def measure(rounds: int, seconds: float, connections: int = 256) -> dict[str, dict]:
    mine = sorted(os.sched_getaffinity(0))
    half = max(1, len(mine) // 2)
    server_cpus, client_cpus = set(mine[:half]), set(mine[half:]) or set(mine)
    os.sched_setaffinity(0, server_cpus)  # this process: the server and its compute thread
    try:
        return _measure(rounds, seconds, connections, client_cpus)
    finally:
        os.sched_setaffinity(0, mine)


def _measure(rounds: int, seconds: float, connections: int,
             client_cpus: set[int]) -> dict[str, dict]:
    port = servers.free_port()
    settings = Settings(port=port, host="127.0.0.1", access_log=False, metrics=True,
                        grpc_port=0, max_queue_requests=4096, api_keys=KEY)
    app = create_app(settings)
    shed = app.state.services.shed
    real = (shed.engine, shed.limit)
    shed.engine.batcher.admission.enabled = False  # only the refusal under test
    server = DrainingServer(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    x = np.random.default_rng(3).standard_normal(1024).astype("<f4").tobytes()
    url = f"http://127.0.0.1:{port}/v1/activations/relu?shape=1024&dtype=float32&timeout=10"
    headers = {"Content-Type": "application/octet-stream", "Authorization": f"Bearer {KEY}"}
    got: dict[str, list[tuple[float, float, float]]] = {c: [] for c in CASES}
    try:
        wrk.run(url, x, headers, connections=connections, seconds=1, cpus=client_cpus)  # warm
        for _ in range(rounds):
            for case in CASES:
                _hold(shed, case, real)
                refused0 = shed.refused
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                res = wrk.run(url, x, headers, connections=connections, seconds=seconds,
                              cpus=client_cpus)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                n = max(res.requests, 1)
                refused = shed.refused - refused0
                if case == "served" and res.errors:
                    raise RuntimeError(f"served: {res.errors} answers were not 200")
                if case != "served" and refused < res.requests:
                    raise RuntimeError(f"{case}: {refused} refused of {res.requests}")
                got[case].append((res.rps, (r1.ru_utime - r0.ru_utime) / n,
                                  (r1.ru_stime - r0.ru_stime) / n))
    finally:
        _hold(shed, "served", real)
        server.should_exit = True
        thread.join(30)
    return {c: {"per_s": statistics.median(v[0] for v in rows),
                "user_us": statistics.median(v[1] for v in rows) * 1e6,
                "sys_us": statistics.median(v[2] for v in rows) * 1e6}
            for c, rows in got.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds a round and case")
    a = p.parse_args(argv)
    if wrk.available() is None:
        print(wrk.INSTALL_HINT)
        return 1
    got = measure(a.rounds, a.seconds)
    served = got["served"]["user_us"] + got["served"]["sys_us"]
    print("| case | answers/s | CPU µs/answer (user + system) | vs served |\n|---|---|---|---|")
    for case, g in got.items():
        total = g["user_us"] + g["sys_us"]
        print(f"| {case} | {g['per_s']:,.0f} | {total:.1f} ({g['user_us']:.1f} + "
              f"{g['sys_us']:.1f}) | {total / served:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
