"""Keep nginx's limits on requests in flight to actserve where the server measures them
(docs/deployment.md, "Overload: let nginx refuse").

    python -m scripts.nginx_limits --stats http://127.0.0.1:8000/v1/stats \\
        --out /etc/nginx/actserve-limits.conf --nginx-pid /run/nginx.pid

nginx's ``location`` includes ``--out``: two ``limit_conn`` lines, one per size class.
Every ``--every`` seconds this reads ``overload.front_limits`` from the server's
``/v1/stats`` (per size class, the rate the server answers that class at while saturated
times ``front_delay_ms``; with ``--workers N``, summed over the workers) and, when a class's limit
moved by more than ``--change`` (25 %) of the one in force and ``--min-interval`` (10 s) has
passed since the last reload, writes the file (whole, by rename) and reloads nginx (SIGHUP to its master:
new workers take the new limits, the shared zones keep their counts). A class the server has
not measured yet keeps what the file said, or ``--small``/``--large`` at the start. The
server unreachable: nothing changes. Standard library only: it runs beside nginx in its pod
or host (with ``shareProcessNamespace`` in Kubernetes, to signal nginx's master).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

CLASSES = {"small": "actserve_small", "large": "actserve_large"}  # class -> nginx zone


def fetch(url: str, timeout_s: float = 2.0) -> dict | None:
    """``/v1/stats``'s front limits, or None when the server does not answer them."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            stats = json.loads(answer.read())
    except (OSError, ValueError):
        return None
    return (stats.get("overload") or {}).get("front_limits")


def wanted(front: dict | None) -> dict[str, int]:
    """The measured limit of each class that has one."""
    out = {}
    for name in CLASSES:
        limit = ((front or {}).get(name) or {}).get("limit")
        if isinstance(limit, int) and limit > 0:
            out[name] = limit
    return out


def moved(current: dict[str, int], new: dict[str, int], change: float) -> dict[str, int] | None:
    """The limits to put in force (``current`` updated by ``new``) when any class moved by
    more than ``change`` of its limit in force; else None."""
    if not any(abs(limit - current[name]) > change * current[name]
               for name, limit in new.items()):
        return None
    return {**current, **new}


def render(limits: dict[str, int], source: str) -> str:
    lines = [f"# actserve's limits on requests in flight, from {source} "
             f"(scripts/nginx_limits.py rewrites this file)"]
    lines += [f"limit_conn {zone} {limits[name]};" for name, zone in CLASSES.items()]
    return "\n".join(lines) + "\n"


def read(path: Path) -> dict[str, int]:
    """The limits a file written by ``render`` holds, by class."""
    zones = {zone: name for name, zone in CLASSES.items()}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.rstrip(";").split()
        if len(parts) == 3 and parts[0] == "limit_conn" and parts[1] in zones:
            out[zones[parts[1]]] = int(parts[2])
    return out


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def master_pid(pid_file: Path) -> int:
    return int(pid_file.read_text().split()[0])


class Keeper:
    """The limits in force and when they were last put in force; ``step`` is one look."""

    def __init__(self, source: str, out: Path, reload: Callable[[], None],
                 initial: dict[str, int], change: float = 0.25, min_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 get: Callable[[str], dict | None] = fetch) -> None:
        self.source, self.out, self.reload = source, out, reload
        self.limits = dict(initial)
        self.change, self.min_interval_s = change, min_interval_s
        self.clock, self.get = clock, get
        self.last: float | None = None

    def start(self) -> None:
        """Take the limits the file holds (a keeper started again), else write the initial
        ones (nginx reads them when it starts)."""
        if self.out.exists():
            self.limits.update(read(self.out))
        write(self.out, render(self.limits, self.source))

    def step(self) -> dict[str, int] | None:
        """Read the server once; the new limits when nginx was reloaded with them."""
        now = self.clock()
        if self.last is not None and now - self.last < self.min_interval_s:
            return None
        new = moved(self.limits, wanted(self.get(self.source)), self.change)
        if new is None:
            return None
        write(self.out, render(new, self.source))
        self.reload()
        self.limits, self.last = new, now
        return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.nginx_limits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats", required=True, help="the server's /v1/stats URL")
    p.add_argument("--out", required=True, type=Path, help="the file nginx's location includes")
    p.add_argument("--nginx-pid", required=True, type=Path, help="nginx's pid file (its master)")
    p.add_argument("--small", type=int, default=128, help="small requests' limit until measured")
    p.add_argument("--large", type=int, default=16, help="large requests' limit until measured")
    p.add_argument("--every", type=float, default=1.0, help="seconds between looks")
    p.add_argument("--change", type=float, default=0.25,
                   help="reload when a limit moves by more than this fraction")
    p.add_argument("--min-interval", type=float, default=10.0,
                   help="seconds between reloads at least (each one starts new nginx workers "
                        "and closes the old ones' idle connections)")
    p.add_argument("--once", action="store_true", help="write the initial file and exit")
    a = p.parse_args(argv)

    def reload() -> None:
        os.kill(master_pid(a.nginx_pid), signal.SIGHUP)

    keeper = Keeper(a.stats, a.out, reload, {"small": a.small, "large": a.large},
                    a.change, a.min_interval)
    keeper.start()
    if a.once:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(a.every):
        try:
            new = keeper.step()
        except (OSError, ValueError) as exc:  # nginx gone, no pid yet, the file not writable
            print(f"nginx_limits: {exc}", file=sys.stderr, flush=True)
            continue
        if new is not None:
            print(f"{time.strftime('%H:%M:%S')} nginx reloaded: "
                  + ", ".join(f"{k} {v}" for k, v in new.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
