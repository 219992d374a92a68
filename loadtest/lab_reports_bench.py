"""What the lab's reports cost (docs/lab.md, docs/benchmarks.md "lab reports"): two real
servers side by side in one run, one with profiles off (the default) and one with
``ACTSERVE_ALLOW_PROFILE=true``, each sent the same native binary requests in turn by one
client, interleaved, so drift on a shared machine hits every cell alike:

* ``plain``: a request that asks for nothing, on each server. The ratio profile-allowed /
  default is what the lab costs a request that does not ask (the bar: <= 1.05).
* ``numerics`` and ``grad``: the same request asking for the numerics report or for the
  gradient, on the default server: what asking costs.

    python -m loadtest.lab_reports_bench [--elements 4096] [--rounds 5] [--requests 200]

Prints one JSON line: median latency (ms) of each cell over the rounds' medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.servers import running, start_actserve

BAR = 1.05


def _median_ms(client: httpx.Client, url: str, body: bytes, params: dict, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(url, content=body, params=params,
                        headers={"content-type": "application/octet-stream"})
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
    return statistics.median(times) * 1e3


def measure(elements: int = 4096, rounds: int = 5, requests: int = 200) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="actserve-lab-bench-"))
    x = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    body = x.tobytes()
    base = {"shape": str(elements)}
    cells: dict[str, list[float]] = {"plain_default": [], "plain_profile_allowed": [],
                                     "numerics": [], "grad": []}
    children = [start_actserve("lab-default", log_dir),
                start_actserve("lab-profile", log_dir, {"allow_profile": True})]
    with running(children), httpx.Client(timeout=60) as c:
        default, allowed = (f"{ch.url}/v1/activations/gelu" for ch in children)
        for url in (default, allowed):  # warm both paths
            _median_ms(c, url, body, base, 20)
        _median_ms(c, default, body, {**base, "report": "numerics"}, 5)
        _median_ms(c, default, body, {**base, "outputs": "value,grad"}, 5)
        for _ in range(rounds):
            cells["plain_default"].append(_median_ms(c, default, body, base, requests))
            cells["plain_profile_allowed"].append(_median_ms(c, allowed, body, base, requests))
            cells["numerics"].append(_median_ms(c, default, body,
                                                {**base, "report": "numerics"}, requests))
            cells["grad"].append(_median_ms(c, default, body,
                                            {**base, "outputs": "value,grad"}, requests))
    med = {k: statistics.median(v) for k, v in cells.items()}
    off_ratio = med["plain_profile_allowed"] / med["plain_default"]
    return {"group": "lab-reports", "elements": elements, "rounds": rounds,
            **{f"{k}_ms": round(v, 3) for k, v in med.items()},
            "allowed_vs_default": round(off_ratio, 3),
            "numerics_vs_plain": round(med["numerics"] / med["plain_default"], 3),
            "grad_vs_plain": round(med["grad"] / med["plain_default"], 3),
            "bar": BAR, "passed": off_ratio <= BAR}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=200)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.elements, a.rounds, a.requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
