"""Locust load test for actserve.

    python -m locust -f loadtest/locustfile.py --host http://127.0.0.1:8000  # web UI
    make loadtest                                                           # headless, bounded

What each simulated client sends is chosen by weighted mixes given as Locust command-line
options (also settable in the web UI): ``--act-sizes 1024:4,65536:1``,
``--act-activations relu:4,gelu:2,...``, ``--act-protocols native-binary:3,...``,
``--act-modes default:6,float16:1,...``; ``--act-seed`` makes every client's sequence and
every payload the same from run to run. Each answer is compared bit for bit with the
reference (the activation applied to that request alone); any difference is a Locust
failure. The server's ``Server-Timing`` parts (decode, queue, compute, encode) are kept in
statistics of their own, apart from the requests (they are not requests: Locust's totals and
its HTML report count only what was sent), and written to
``<csv prefix>_final_server_timing.csv``. Every ``--act-progress-s`` seconds (default 5; 0:
never) a progress line shows requests, failures, req/s, p50 and p99 so far.
"""

from __future__ import annotations

import csv
import itertools
import random
import threading
import time

import gevent
from locust import FastHttpUser, events, task
from locust.stats import PERCENTILES_TO_REPORT, RequestStats, StatsCSV

from loadtest import payloads
from loadtest.payloads import server_timing, weighted

# The payloads live in the repository's ``loadtest`` package: the folder that holds it must
# be on the import path (``python -m locust`` run from the checkout, as run_locust.py does,
# or PYTHONPATH, as the loadtest image sets).
from loadtest.progress import progress_line

DEFAULTS = {
    "act_sizes": "1024:4,65536:1",
    "act_activations": "relu:4,gelu:2,sigmoid:1,silu:1,leaky_relu:1",
    "act_protocols": "native-binary:3,native-json:1,v2-binary:2",
    "act_modes": "default:6,float16:1,bfloat16:1,amp:1,inplace:1",
}
MODES = {
    "default": {},
    "float16": {"compute_dtype": "float16"},
    "bfloat16": {"compute_dtype": "bfloat16"},
    "amp": {"amp": True},
    "inplace": {"inplace": True},
}
PARAMS = {"leaky_relu": (("negative_slope", 0.1),)}
NO_INPLACE = {"gelu", "sigmoid"}  # activations whose in-place variant the mix avoids
TIMING_PARTS = ("decode", "queue", "compute", "encode")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    add = parser.add_argument
    add("--act-sizes", default=DEFAULTS["act_sizes"], include_in_web_ui=True,
        help="elements:weight,... (e.g. 1024:4,65536:1)")
    add("--act-activations", default=DEFAULTS["act_activations"], include_in_web_ui=True,
        help="activation:weight,...")
    add("--act-protocols", default=DEFAULTS["act_protocols"], include_in_web_ui=True,
        help="weights over native-binary, native-json, v2-binary, v2-json")
    add("--act-modes", default=DEFAULTS["act_modes"], include_in_web_ui=True,
        help="weights over default, float16, bfloat16, amp, inplace")
    add("--act-seed", type=int, default=1234, include_in_web_ui=True,
        help="seed of every client's choices and of the payloads")
    add("--act-variants", type=int, default=4, include_in_web_ui=True,
        help="distinct payloads per request kind")
    add("--act-progress-s", type=float, default=5.0, include_in_web_ui=False,
        help="seconds between progress lines (0: none)")


class Mix:
    """The parsed mixes, and the payload and reference answer of each request kind."""

    def __init__(self, options) -> None:
        self.sizes = weighted(options.act_sizes)
        self.activations = weighted(options.act_activations)
        self.protocols = weighted(options.act_protocols)
        self.modes = weighted(options.act_modes)
        for p in self.protocols[0]:
            if p not in payloads.PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}; use {', '.join(payloads.PROTOCOLS)}")
        for m in self.modes[0]:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; use {', '.join(MODES)}")
        self.seed = options.act_seed
        self.variants = max(1, options.act_variants)
        self._cache: dict = {}
        self._lock = threading.Lock()

    def pick(self, rng: random.Random) -> tuple[payloads.Case, int]:
        act = rng.choices(*self.activations)[0]
        mode = rng.choices(*self.modes)[0]
        proto = rng.choices(*self.protocols)[0]
        if mode == "inplace" and act in NO_INPLACE:
            mode = "default"
        if proto == "v2-json" and mode in ("float16", "bfloat16"):
            proto = "v2-binary"  # 16-bit outputs travel only as binary in v2
        case = payloads.Case(act, int(rng.choices(*self.sizes)[0]), proto, PARAMS.get(act, ()),
                             **MODES[mode])
        return case, rng.randrange(self.variants)

    def request(self, case: payloads.Case, variant: int):
        key = (case, variant)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            x = payloads.values(case, self.seed * 1000 + variant)
            hit = (payloads.build(case, x), payloads.expected(case, x))
            with self._lock:
                self._cache[key] = hit
        return hit


_MIX: list[Mix] = []
_USER_IDS = itertools.count()
# Server-Timing phases: statistics of their own, never counted as requests
TIMING = RequestStats(use_response_times_cache=False)
_PROGRESS: list = []


def _report_progress(environment, every: float) -> None:
    started = time.monotonic()
    since = (environment.stats.total.num_requests, 0.0)
    while True:
        gevent.sleep(every)
        elapsed = time.monotonic() - started
        print(progress_line(environment.stats.total, elapsed, since), flush=True)
        since = (environment.stats.total.num_requests, elapsed)


@events.test_start.add_listener
def _on_start(environment, **_kw) -> None:
    _MIX.clear()
    _MIX.append(Mix(environment.parsed_options))
    TIMING.reset_all()
    every = getattr(environment.parsed_options, "act_progress_s", 0) or 0
    if every > 0 and not _PROGRESS:
        _PROGRESS.append(gevent.spawn(_report_progress, environment, every))


@events.test_stop.add_listener
def _on_stop(**_kw) -> None:
    while _PROGRESS:
        _PROGRESS.pop().kill(block=False)


_ENV: list = []


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    _ENV[:] = [environment]


@events.quit.add_listener
def _final_csv(**_kw) -> None:
    """Write the final statistics as ``<csv prefix>_final_{stats,failures}.csv``. Locust's own
    periodic CSV writer may stop before the last requests are counted; these files are
    written once every request has been."""
    environment = _ENV[0] if _ENV else None
    prefix = getattr(environment.parsed_options, "csv_prefix", None) if environment else None
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_final_stats.csv", "w", newline="") as fh:
        writer.requests_csv(csv.writer(fh))
    with open(f"{prefix}_final_failures.csv", "w", newline="") as fh:
        writer.failures_csv(csv.writer(fh))
    with open(f"{prefix}_final_server_timing.csv", "w", newline="") as fh:
        write_timing_csv(csv.writer(fh))


def write_timing_csv(out) -> None:
    out.writerow(["Phase", "Count", "Average ms", "50%", "95%", "99%", "Max ms"])
    for name in TIMING_PARTS:
        e = TIMING.entries.get((name, "server-timing"))
        if e is None or not e.num_requests:
            continue
        out.writerow([name, e.num_requests, round(e.avg_response_time, 3),
                      e.get_response_time_percentile(0.5), e.get_response_time_percentile(0.95),
                      e.get_response_time_percentile(0.99), round(e.max_response_time, 3)])


class ActivationUser(FastHttpUser):
    """One client: a seeded sequence of requests from the configured mixes."""

    def on_start(self) -> None:
        if not _MIX:
            _MIX.append(Mix(self.environment.parsed_options))
        self.mix = _MIX[0]
        self.rng = random.Random(self.mix.seed * 7919 + next(_USER_IDS))

    @task
    def activate(self) -> None:
        case, variant = self.mix.pick(self.rng)
        req, want = self.mix.request(case, variant)
        name = f"{case.protocol} {case.size}"
        with self.client.post(req.path, data=req.body, headers=req.headers, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                got = payloads.parse(case, resp.headers, resp.content)
            except (ValueError, KeyError, TypeError) as exc:
                resp.failure(f"unreadable answer for {case.label}: {exc}")
                return
            problem = payloads.mismatch(case, got, want)
            if problem:
                resp.failure(f"wrong answer: {problem}")
                return
            resp.success()
            timing = server_timing(resp.headers.get("server-timing"))
        for part in TIMING_PARTS:
            if part in timing:
                TIMING.log_request("server-timing", part, timing[part], 0)
