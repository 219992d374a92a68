"""What a refusal costs against a served request (``python -m loadtest.refusal_cost``,
part of ``make bench BENCH_ARGS=--groups=overload``).

One process, one event loop, the real app and uvicorn's HTTP protocol class as the server
builds it (``uvicorn_config``), fed whole requests (native binary, ``relu``) on 256
keep-alive connections whose transport only collects what is written: no sockets, no
client, so the CPU seconds per request are the server's alone. Four cases, the same
request bytes:

* ``served``: computed and answered 200;
* ``refused after decode``: the engine's ``submit`` refuses it (as the batcher does when
  the prediction with the exact size says late) — the body read and decoded first;
* ``refused at admit``: the engine's ``admit`` refuses it, before the body is read, in the
  application (the ASGI task, the stack, the framework's error response);
* ``refused in the protocol``: ``service/http/shed.py`` refuses it as soon as its headers
  are parsed, while the engine says it is busy (the request's headers arrive in two
  reads, so the raw-bytes path cannot see them whole);
* ``refused unparsed by the engine``: the protocol refuses it from the raw bytes, never
  parsed, with what the busy engine's admission says (``Shed.decide``);
* ``refused unparsed``: the protocol refuses it from the raw bytes while congested with
  the application holding its limit, the cheapest answer (``ShedConnection.fast_refusal``).

The transport makes no system calls: a real socket adds a receive and a send per request
(several microseconds each on a VM), to every case alike.

Prints CPU microseconds per request (process time: the compute thread included) and each
refusal's ratio to a served request, medians of several rounds, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from service.engine.admission import PredictedLate
from service.http.app import create_app
from service.http.server import uvicorn_config
from service.settings import Settings

CONNS = 256


class _Transport:
    def __init__(self, owner: _Counter) -> None:
        self.owner = owner

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data) -> None:
        if bytes(data[:9]) == b"HTTP/1.1 ":
            self.owner.answered(int(bytes(data[9:12])))

    def writelines(self, parts) -> None:
        for p in parts:
            self.write(p)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.want = 0
        self.statuses: dict[int, int] = {}
        self.done: asyncio.Event | None = None

    def answered(self, status: int) -> None:
        self.n += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.n >= self.want and self.done is not None:
            self.done.set()


class _Refusing:
    """The server's engine, busy and refusing every hint: what the protocol sees under
    overload."""

    def __init__(self, engine) -> None:
        self.registry = engine.registry

    def busy(self) -> bool:
        return True

    def admit(self, hint=None) -> None:
        raise PredictedLate("the server would finish this request late")


def hold_shed(shed, case: str, engine, limit) -> None:
    """The shed's state for ``case`` (set, not measured): for the protocol's refusals
    (``refused in the protocol``, ``refused unparsed...``) the engine (``engine``, the real
    one) refusing every hint, and for ``refused unparsed`` congested with its limit held
    and whatever it holds leaving no time (``limit``: the real one otherwise); the shed
    off for the other cases, so only the refusal under test is made. No interval ends
    during a run."""
    protocol = case.startswith(("refused in", "refused unparsed"))
    cheapest = case == "refused unparsed"
    shed.engine = _Refusing(engine) if protocol else engine
    shed.enabled = protocol
    shed.interval = 1e9
    shed._window = time.monotonic()
    shed.congested = cheapest
    shed.cap = 0 if cheapest else 1 << 30
    shed.limit = (lambda budget: 0) if cheapest else limit


def _raise(*args, **kwargs):
    raise PredictedLate("the server would finish this request late")


async def _round(conns, counter: _Counter, raw: bytes, per_conn: int,
                 split: bool = False) -> float:
    """CPU seconds per request for ``per_conn`` requests on every connection (``split``:
    each request in two reads, its request line first)."""
    counter.n, counter.want = 0, len(conns) * per_conn
    counter.done = asyncio.Event()
    line = raw.find(b"\r\n") + 2
    t0 = time.process_time()
    for _ in range(per_conn):
        for c in conns:
            if split:
                c.data_received(raw[:line])
                c.data_received(raw[line:])
            else:
                c.data_received(raw)
        await asyncio.sleep(0)
        while counter.n < counter.want * (_ + 1) // per_conn:
            await asyncio.sleep(0)
    await asyncio.wait_for(counter.done.wait(), 60)
    return (time.process_time() - t0) / counter.want


async def main_async(elements: int, rounds: int, per_conn: int) -> dict:
    settings = Settings(access_log=False, metrics=True, max_queue_requests=4096,
                        max_batch_requests=256)
    app = create_app(settings)
    svc = app.state.services
    config = uvicorn_config(app, settings, log_level="warning")
    config.load()
    from uvicorn.server import ServerState

    loop = asyncio.get_running_loop()
    state = ServerState()
    counter = _Counter()
    conns = []
    for _ in range(CONNS):
        p = config.http_protocol_class(config=config, server_state=state, app_state={},
                                       _loop=loop)
        p.connection_made(_Transport(counter))
        conns.append(p)
    x = np.random.default_rng(3).standard_normal(elements).astype("<f4").tobytes()
    raw = (f"POST /v1/activations/relu?shape={elements}&dtype=float32 HTTP/1.1\r\n"
           f"Host: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
           f"Content-Length: {len(x)}\r\n\r\n").encode() + x
    engine, shed = svc.engine, svc.shed
    real_admit, real_submit, real_shed_engine = engine.admit, engine.submit, shed.engine
    real_limit = shed.limit
    results: dict[str, list[float]] = {k: [] for k in (
        "served", "refused after decode", "refused at admit", "refused in the protocol",
        "refused unparsed by the engine", "refused unparsed")}
    async with app.router.lifespan_context(app):
        await _round(conns, counter, raw, 2)  # warm
        for _ in range(rounds):
            for case in results:
                engine.admit, engine.submit = real_admit, real_submit
                if case == "refused after decode":
                    engine.submit = _raise
                elif case == "refused at admit":
                    engine.admit = _raise
                hold_shed(shed, case, real_shed_engine, real_limit)
                engine.batcher.admission.enabled = False
                counter.statuses = {}
                results[case].append(await _round(conns, counter, raw, per_conn,
                                                  split=case == "refused in the protocol"))
                want = 200 if case == "served" else 503
                if set(counter.statuses) != {want}:
                    raise RuntimeError(f"{case}: answers {counter.statuses}, not all {want}")
        engine.admit, engine.submit, shed.engine = real_admit, real_submit, real_shed_engine
    return {k: statistics.median(v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", default="1024,262144")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-conn", type=int, default=8, help="requests per connection a round")
    a = p.parse_args(argv)
    print("| elements | case | CPU µs/request | vs served |\n|---|---|---|---|")
    for n in (int(e) for e in a.elements.split(",")):
        per_conn = a.per_conn if n <= 4096 else max(1, a.per_conn // 4)
        try:
            import uvloop

            got = uvloop.run(main_async(n, a.rounds, per_conn))
        except ImportError:
            got = asyncio.run(main_async(n, a.rounds, per_conn))
        served = got["served"]
        for case, s in got.items():
            print(f"| {n:,} | {case} | {s * 1e6:.1f} | {s / served:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
