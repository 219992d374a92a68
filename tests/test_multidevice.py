"""Several devices in one process: one executor (compute thread) per device behind the same
queue, least-loaded dispatch. Two CPU executors stand in for two GPUs
(``ACTSERVE_DEVICE=cpu,cpu``); the dispatch code does not know the difference.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.engine.executor import resolve_devices
from service.settings import Settings

from .conftest import reference, same_bits, serve, subprocess_server


def post_relu(url: str, values: np.ndarray, client: httpx.Client | None = None) -> httpx.Response:
    c = client or httpx
    return c.post(f"{url}/v1/activations/relu", params={"shape": str(values.size)},
                  content=values.tobytes(), headers={"content-type": "application/octet-stream"},
                  timeout=60)


def record_dispatch(engine) -> list[int]:
    """Wrap each executor's ``submit`` (called on the event loop) to log its index."""
    log: list[int] = []
    for ex in engine.pool.executors:
        original = ex.submit

        def submit(batch, _orig=original, _index=ex.index):
            log.append(_index)
            return _orig(batch)

        ex.submit = submit
    return log


def hold(executor) -> threading.Event:
    """Occupy ``executor``'s compute thread until the returned event is set."""
    gate, started = threading.Event(), threading.Event()

    def blocked(_compute):
        started.set()
        gate.wait(60)

    executor.call(blocked)
    assert started.wait(30), "the compute thread did not pick up the gate"
    return gate


def on_loop(srv, fn):
    """Run ``fn`` on the server's event loop (the executors' bookkeeping lives there)."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), srv.loop).result(10)


# -- settings and device resolution -----------------------------------------------------
@pytest.mark.parametrize(("spec", "expected"), [
    ("cpu,cpu", ["cpu", "cpu"]),
    (" cpu , cpu , cpu ", ["cpu", "cpu", "cpu"]),
    ("cpu", ["cpu"]),
])
def test_device_lists_resolve_to_one_executor_each(spec, expected):
    assert resolve_devices(Settings(device=spec).device) == expected


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU fallback")
def test_all_without_gpus_falls_back_to_the_cpu():
    assert resolve_devices(Settings(device="all").device) == ["cpu"]


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu;cuda", ",", "cuda:0,npu"])
def test_bad_device_lists_are_refused_with_the_variable_name(bad):
    with pytest.raises(ValueError, match="ACTSERVE_DEVICE"):
        Settings(device=bad)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_devices_where_there_is_none_fail_at_start_with_a_clear_message():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_devices("cuda:0,cuda:1")


# -- dispatch -----------------------------------------------------------------------------
def test_two_executors_have_their_own_compute_threads():
    with serve(device="cpu,cpu") as srv:
        pool = srv.engine.pool
        assert [ex.device for ex in pool.executors] == ["cpu", "cpu"]
        assert [ex.index for ex in pool.executors] == [0, 1]
        names = [ex._thread.name for ex in pool.executors]
        assert len(set(names)) == 2 and all(ex._thread.is_alive() for ex in pool.executors)
        ready = httpx.get(srv.url + "/readyz", timeout=10).json()
        assert ready["devices"] == ["cpu", "cpu"]


def test_idle_executor_takes_the_work_while_the_other_is_busy():
    """Executor 0's thread is held; a batch sent to it waits there, and every later request
    goes to executor 1 and is answered while executor 0 is still held."""
    rng = np.random.default_rng(3)
    with serve(device="cpu,cpu") as srv:
        ex0 = srv.engine.pool.executors[0]
        dispatched = record_dispatch(srv.engine)
        gate = hold(ex0)
        try:
            with ThreadPoolExecutor(1) as background:
                first_x = rng.standard_normal(64).astype(np.float32)
                first = background.submit(post_relu, srv.url, first_x)
                # Both idle: the tie goes to executor 0, whose thread is held by the gate.
                while not dispatched:
                    assert not first.done(), first.result().text
                    threading.Event().wait(0.005)
                assert dispatched == [0]
                assert on_loop(srv, lambda: ex0.inflight_batches) == 1
                with httpx.Client() as client:
                    for _ in range(20):
                        x = rng.standard_normal(int(rng.integers(1, 300))).astype(np.float32)
                        r = post_relu(srv.url, x, client)
                        assert r.status_code == 200, r.text
                        expected, _ = reference("relu", x, "float32")
                        assert same_bits(np.frombuffer(r.content, dtype="<f4"), expected)
                assert not first.done(), "executor 0 answered while its thread was held"
                assert dispatched == [0] + [1] * 20
                gate.set()
                r = first.result(30)
            assert r.status_code == 200, r.text
            expected, _ = reference("relu", first_x, "float32")
            assert same_bits(np.frombuffer(r.content, dtype="<f4"), expected)
        finally:
            gate.set()


def test_least_loaded_choice():
    """``idle()``: only ready executors with no batch in flight; the lightest one first."""
    with serve(device="cpu,cpu,cpu") as srv:
        pool = srv.engine.pool
        ex0, ex1, ex2 = pool.executors

        def probe():
            saved = [(e.inflight_batches, e.inflight_elements) for e in pool.executors]
            try:
                picks = [pool.idle().index]
                ex0.inflight_batches, ex0.inflight_elements = 1, 1000
                picks.append(pool.idle().index)
                ex1.inflight_batches, ex1.inflight_elements = 1, 10
                picks.append(pool.idle().index)
                ex2.inflight_batches, ex2.inflight_elements = 1, 5
                picks.append(pool.idle())
                ex1.inflight_batches, ex1.inflight_elements = 0, 0
                pool._ready.discard(ex1.index)  # e.g. restarting after its thread died
                picks.append(pool.idle())
                pool._ready.add(ex1.index)
                picks.append(pool.idle().index)
                return picks
            finally:
                for e, (b, n) in zip(pool.executors, saved, strict=True):
                    e.inflight_batches, e.inflight_elements = b, n

        assert on_loop(srv, probe) == [0, 1, 2, None, None, 1]


def spread_over_two(srv, inputs: list[np.ndarray], workers: int,
                    timeout: float) -> tuple[list[httpx.Response], list[int]]:
    """Post every input concurrently while executor 0 is held until executor 1 has taken
    work, so both executors serve; returns the answers and the executors dispatched to."""
    dispatched = record_dispatch(srv.engine)
    gate = hold(srv.engine.pool.executors[0])
    with httpx.Client(limits=httpx.Limits(max_connections=workers)) as client, \
            ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(post_relu, srv.url, x, client) for x in inputs]
        while 1 not in dispatched:
            threading.Event().wait(0.005)
        gate.set()
        return [f.result(timeout) for f in futures], dispatched


def test_both_executors_serve_concurrent_traffic_bit_exact():
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32)
              for _ in range(120)]
    with serve(device="cpu,cpu") as srv:
        answers, dispatched = spread_over_two(srv, inputs, 16, 60)
    for x, r in zip(inputs, answers, strict=True):
        assert r.status_code == 200, r.text
        expected, _ = reference("relu", x, "float32")
        assert same_bits(np.frombuffer(r.content, dtype="<f4"), expected)
    assert set(dispatched) == {0, 1}


def test_one_executor_dying_leaves_the_process_ready():
    """The thread of one executor dies; the other keeps the server ready and answering
    while the dead one is restarted."""
    with serve(device="cpu,cpu", fault_injection=True, executor_restart_limit=2) as srv:
        pool = srv.engine.pool
        changes: list[bool] = []
        on_loop(srv, lambda: setattr(pool, "on_readiness_change", changes.append))
        x = np.linspace(-2, 2, 16, dtype=np.float32)
        r = httpx.post(srv.url + "/v1/activations/relu", params={"shape": "16"},
                       content=x.tobytes(), headers={"content-type": "application/octet-stream",
                                                     "x-actserve-fault": "kill"}, timeout=60)
        assert r.status_code == 503, r.text
        r = post_relu(srv.url, x)
        assert r.status_code == 200, r.text
        assert pool.restarts == 1
        assert False not in changes  # readiness never dropped: the other executor was ready


@pytest.mark.gpu
def test_two_cuda_executors_share_the_queue():
    """On a GPU machine: two executors on CUDA (two GPUs, or two on the one there is)."""
    import torch

    devices = "cuda:0,cuda:1" if torch.cuda.device_count() > 1 else "cuda:0,cuda:0"
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(int(rng.integers(1, 50_000))).astype(np.float32)
              for _ in range(64)]
    with serve(device=devices) as srv:
        answers, dispatched = spread_over_two(srv, inputs, 8, 120)
    for x, r in zip(inputs, answers, strict=True):
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, dtype="<f4"), np.maximum(x, np.float32(0)))
    assert set(dispatched) == {0, 1}


def test_subprocess_with_two_cpu_executors():
    """``ACTSERVE_DEVICE=cpu,cpu`` through the environment, as a container would set it."""
    with subprocess_server({"ACTSERVE_DEVICE": "cpu,cpu", "ACTSERVE_LOG_LEVEL": "warning"}) as (
            _proc, url):
        assert httpx.get(url + "/readyz", timeout=10).json()["devices"] == ["cpu", "cpu"]
        x = np.arange(-8, 8, dtype=np.float32)
        r = post_relu(url, x)
        assert r.status_code == 200
        assert np.frombuffer(r.content, dtype="<f4").tolist() == np.maximum(x, 0).tolist()
