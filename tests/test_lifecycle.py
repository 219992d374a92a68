"""Batching behaviour, executor death and restart, and SIGTERM under load."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np

from .conftest import reference, same_bits, serve, subprocess_server
from .gates import held, wait_for

BIN = {"content-type": "application/octet-stream"}


def _post_bin(c, name: str, x: np.ndarray, **extra):
    return c.post(f"/v1/activations/{name}", params={"shape": str(x.size)}, content=x.tobytes(),
                  headers={**BIN, **extra})


def test_batches_larger_than_one_form_under_concurrency(server):
    xs = [np.full(10 + i, i - 8, dtype="<f4") for i in range(16)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async with held(server.engine, len(xs)):
                tasks = [asyncio.ensure_future(_post_bin(c, "relu", x)) for x in xs]
            return await asyncio.gather(*tasks)

    rs = asyncio.run(run())
    sizes = [int(r.headers["x-batch-size"]) for r in rs]
    assert max(sizes) > 1
    batches: dict[tuple[int, int], list[int]] = {}
    for x, r in zip(xs, rs, strict=True):
        key = (int(r.headers["x-batch-size"]), int(r.headers["x-batch-elements"]))
        batches.setdefault(key, []).append(x.size)
    for (n_requests, n_elements), members in batches.items():
        assert len(members) == n_requests and sum(members) == n_elements
    # the batch dispatched before the executor was held, then one batch of everything else
    assert len(batches) <= 2 and max(sizes) >= len(xs) // 2
    for x, r in zip(xs, rs, strict=True):
        assert same_bits(np.frombuffer(r.content, "<f4"), reference("relu", x, "float32")[0])


def _queue_ms(r: httpx.Response) -> float:
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    return float(parts["queue"])


def test_low_load_request_runs_at_once_unless_a_delay_is_configured():
    """With max_delay_us=0 a lone request is dispatched at once; the same request on a
    server told to hold batches open for 300 ms waits that long. Side by side, so the
    first figure means something."""
    x = np.ones(8, dtype="<f4")
    with serve() as fast, serve(max_delay_us=300_000) as slow:
        with httpx.Client(base_url=fast.url) as c:
            fast_q = [_queue_ms(_post_bin(c, "relu", x)) for _ in range(5)]
        with httpx.Client(base_url=slow.url) as c:
            slow_q = _queue_ms(_post_bin(c, "relu", x))
    assert slow_q >= 250  # held open ~300 ms (timer granularity aside)
    assert sorted(fast_q)[2] < 50  # the median lone request did not wait for a batch


def test_killed_compute_thread_is_detected_restarted_and_service_resumes():
    with serve(fault_injection=True) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        transitions: list[bool] = []
        srv.engine.pool.on_readiness_change = transitions.append
        x = np.linspace(-2, 2, 9, dtype="<f4")
        r = _post_bin(c, "tanh", x, **{"x-actserve-fault": "kill"})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]

        async def ready_again():
            await wait_for(lambda: srv.engine.pool.ready, timeout=60)

        asyncio.run(ready_again())
        assert transitions[0] is False and transitions[-1] is True
        assert srv.engine.pool.restarts == 1
        ok = _post_bin(c, "tanh", x)
        assert ok.status_code == 200
        assert same_bits(np.frombuffer(ok.content, "<f4"), reference("tanh", x, "float32")[0])
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics").text
        assert "actserve_executor_restarts_total 1.0" in metrics


def test_sigterm_under_load_answers_every_accepted_request():
    """Requests are held in the queue (max_delay_us) when SIGTERM arrives; every request
    the server accepted gets its correct answer, later ones a 503 or a refused
    connection, and the process exits 0."""
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(1000 + 100 * i).astype("<f4") for i in range(24)]
    env = {"ACTSERVE_MAX_DELAY_US": "400000", "ACTSERVE_MAX_BATCH_REQUESTS": "4"}
    with subprocess_server(env) as (proc, url):
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.ensure_future(_post_bin(c, "silu", x)) for x in xs]

                async def queued() -> int:
                    return (await c.get("/v1/stats")).json()["queue_depth"]

                deadline = asyncio.get_running_loop().time() + 30
                while await queued() < 8 and asyncio.get_running_loop().time() < deadline:
                    pass
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        assert proc.wait(60) == 0
    answered = 0
    for x, r in zip(xs, results, strict=True):
        if isinstance(r, httpx.TransportError):
            continue  # never accepted: the listener was closed
        assert not isinstance(r, BaseException), r
        if r.status_code == 503:
            continue  # refused while draining, with Retry-After
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, "<f4"), reference("silu", x, "float32")[0])
        answered += 1
    assert answered >= 8  # the queued ones were finished, not dropped
