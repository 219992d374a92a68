"""Overload policy (service/engine/admission.py) through the batcher seam: a fake clock and
the fake executors of test_batcher, every batch finished by the test (event-gated), no
sleeps. Every future handed out is checked resolved exactly once on the way out."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest

from service.engine.admission import (
    CONTROLLED_DELAY,
    CURRENT,
    FIFO,
    LIFO,
    Admission,
    ClientShare,
    Hint,
    PredictedLate,
    QueueDelay,
    RemoteWait,
    ServiceModel,
    hint_from,
)
from service.engine.batcher import Batcher
from service.engine.capabilities import Capabilities
from service.engine.ipc import messages
from service.engine.ipc.remote import RemoteEngine
from service.engine.job import Job, JobResult
from service.engine.pool import ExecutorPool
from service.errors import DeadlineExceeded
from service.settings import Settings
from tests.gates import FakeClock
from tests.test_batcher import PLAIN, REGISTRY, FakeExecutor, Tracker, run


class Timed(FakeExecutor):
    """A fake executor whose batches take ``per_element`` fake seconds per element: the
    test advances the clock by that much when it releases a batch."""

    def __init__(self, index: int, clock: FakeClock, per_element: float) -> None:
        super().__init__(index)
        self.clock, self.per_element = clock, per_element

    async def _finish(self, held) -> None:
        await held.go.wait()
        elements = sum(j.numel for j in held.jobs)
        wall = elements * self.per_element
        self.clock.t += wall
        results = [JobResult(j.array, j.wire_dtype, wall, len(held.jobs), elements, self.device)
                   for j in held.jobs]
        self.on_done(self, held.jobs, results, wall)


@asynccontextmanager
async def scheduler(clock: FakeClock, per_element: float = 1e-4, **settings):
    ex = Timed(0, clock, per_element)
    pool = ExecutorPool([ex], REGISTRY, Capabilities(), probe=lambda c, r: {},
                        self_test=lambda c, r, caps: [])
    settings.setdefault("max_batch_requests", 1)  # one request a batch: exact arithmetic
    batcher = Batcher(Settings(**settings), pool, clock=clock)
    tracker = Tracker(batcher)
    await batcher.start()
    try:
        yield batcher, ex
    finally:
        for held in ex.batches:
            held.go.set()
        await batcher.stop()
    tracker.check()


def job(clock: FakeClock, n: int = 1000, *, timeout: float = 1.0, priority: int = 0,
        activation: str = "relu") -> Job:
    act = REGISTRY.get(activation)
    return Job(activation=act, params=act.parse_params({}), array=np.zeros(n, np.float32),
               wire_dtype="float32", mode=PLAIN, deadline=clock.t + timeout,
               priority=priority)


async def warm(b: Batcher, ex: Timed, clock: FakeClock, n: int = 1000) -> None:
    """One batch through, so the service model has a measurement."""
    fut = b.submit(job(clock, n))
    (await ex.next_batch()).release()
    await fut


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def serve(ex: Timed, futs: list) -> None:
    """Release batches until every future is answered."""
    while True:
        await settle()
        if all(f.done() for f in futs):
            return
        (await ex.next_batch()).release()


# -- the service model -----------------------------------------------------------------------
def test_the_model_learns_per_request_cost_and_bounds_unmeasured_sizes_from_below():
    m = ServiceModel()
    assert m.predict("relu", 1000) == 0.0  # nothing measured: admitted
    m.observe("relu", "cpu", [1000, 1000], 0.2)  # 0.1 s each, batched
    assert m.predict("relu", 1000) == pytest.approx(0.1)
    # a larger, unmeasured size: at least what the smaller one costs, never scaled up
    # (small requests' cost is mostly fixed overhead: scaling it would refuse large ones)
    assert m.predict("relu", 4_000_000) == pytest.approx(0.1)
    assert m.predict("relu", 250) == pytest.approx(0.1 / 4)  # a smaller one: scaled down
    assert m.predict("gelu", 1000) == 0.0  # another activation, never measured: admitted
    m.observe("relu", "cpu", [1000], 0.2)
    assert 0.1 < m.predict("relu", 1000) < 0.2  # a moving mean


# -- admission by predicted finish ----------------------------------------------------------
def test_a_request_that_cannot_finish_by_its_deadline_is_refused_at_once_with_retry_after():
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)  # 0.1 s per 1000-element request
            futs = [b.submit(job(clock)) for _ in range(7)]  # 1 running + 6 queued
            first = await ex.next_batch()
            # queued ahead: 0.6 s, running 0.1 s; 1.2 * (0.7 + 0.1) = 0.96 s fits in 1 s
            futs.append(b.submit(job(clock)))
            with pytest.raises(PredictedLate) as info:
                b.submit(job(clock))  # 1.2 * (0.8 + 0.1) > 1 s
            assert info.value.status == 503 and info.value.retry_after == 1
            assert b.waiting == 7
            # a longer deadline is admitted behind the same work
            futs.append(b.submit(job(clock, timeout=5.0)))
            first.release()
            await serve(ex, futs)
            results = await asyncio.gather(*futs, return_exceptions=True)
            assert all(isinstance(r, JobResult) for r in results)

    run(main())


def test_before_the_body_a_declared_size_and_timeout_are_enough_to_refuse():
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)
            futs = [b.submit(job(clock, timeout=5)) for _ in range(9)]
            held = await ex.next_batch()
            # the headers alone: 4000 bytes of float32, timeout 1 s on the query
            h = hint_from("relu", {"timeout": "1"}, {"content-length": "4000"}, "10.0.0.1",
                          clock.t, 30.0)
            assert (h.elements, h.deadline, h.timed) == (1000, clock.t + 1, True)
            with pytest.raises(PredictedLate):
                b.admit(h)
            b.admit(hint_from("relu", {"timeout": "30"}, {"content-length": "4000"}, None,
                              clock.t, 30.0))  # a long deadline passes
            held.release()
            await serve(ex, futs)
            await asyncio.gather(*futs)

    run(main())


def test_below_capacity_nothing_is_refused_and_nothing_is_late():
    """A known rate: one 0.1 s request arriving every 0.15 s (0.67 of capacity), 1 s
    deadlines, a burst of three on top now and then: every request is admitted and
    answered 200 before its deadline."""
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)
            answered = []
            for i in range(60):
                burst = 3 if i % 20 == 0 else 1
                futs = [b.submit(job(clock)) for _ in range(burst)]
                deadlines = [clock.t + 1.0] * burst
                for _ in range(burst):
                    (await ex.next_batch()).release()
                    await settle()
                for fut, deadline in zip(futs, deadlines, strict=True):
                    assert isinstance(await fut, JobResult)
                    answered.append(clock.t <= deadline)
                clock.t += max(0.0, 0.15 * burst - 0.1 * burst)
            assert all(answered) and len(answered) == 66

    run(main())


def test_a_job_computed_after_its_deadline_is_answered_504_not_200():
    async def main():
        clock = FakeClock()
        async with scheduler(clock, per_element=1e-3) as (b, ex):  # 1 s per request
            fut = b.submit(job(clock, timeout=0.5))  # nothing measured yet: admitted
            (await ex.next_batch()).release()
            with pytest.raises(DeadlineExceeded):
                await fut

    run(main())


def test_a_head_job_that_can_no_longer_finish_in_time_is_shed_uncomputed():
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)
            first = b.submit(job(clock, timeout=5))
            held = await ex.next_batch()
            late = b.submit(job(clock, timeout=0.5))  # predicted 0.24 s: admitted
            clock.t += 0.35  # the running batch took longer than predicted (0.45 s)
            held.release()
            await first
            with pytest.raises(PredictedLate):  # 0.45 + 0.1 > 0.5: not computed
                await late
            assert all(h.jobs[0].future is not late for h in ex.batches)

    run(main())


# -- the discipline ------------------------------------------------------------------------
def test_the_discipline_switches_to_controlled_delay_and_back_when_the_queue_drains():
    async def main():
        clock = FakeClock()
        async with scheduler(clock, overload_target_delay_ms=50, overload_interval_ms=100,
                             overload_max_wait_ms=300) as (b, ex):
            await warm(b, ex, clock)
            a = b.admission
            futs = [b.submit(job(clock, timeout=5)) for _ in range(12)]
            held = await ex.next_batch()
            seen = [a.discipline]
            while not a.overloaded:  # each batch takes 0.1 s: the queue stands
                held.release()
                held = await ex.next_batch()
                seen.append(a.discipline)
            # above 50 ms from the 2nd take, for 100 ms by the 3rd
            assert seen == [FIFO, FIFO, CONTROLLED_DELAY]
            # overloaded: a predicted wait over the 300 ms cap is refused, time to spare or not
            with pytest.raises(QueueDelay) as info:
                b.submit(job(clock, timeout=5))
            assert info.value.status == 503
            held.release()
            await serve(ex, futs)
            await asyncio.gather(*futs)
            assert a.discipline == FIFO and a.switches == 2  # drained: back to FIFO

    run(main())


def test_adaptive_lifo_serves_the_newest_and_sheds_the_stale():
    async def main():
        clock = FakeClock()
        async with scheduler(clock, overload_target_delay_ms=10, overload_interval_ms=10,
                             overload_max_wait_ms=250, overload_lifo=True,
                             max_batch_requests=1) as (b, ex):
            await warm(b, ex, clock)
            a = b.admission
            a.overloaded = True  # as if it had stood above the target
            assert a.discipline == LIFO
            old = [b.submit(job(clock, timeout=5)) for _ in range(2)]
            held = await ex.next_batch()  # the newest of the two runs first
            assert held.jobs[0].future is old[1]
            clock.t += 0.3  # the older one has now waited 0.3 s > 0.25 s
            new = b.submit(job(clock, timeout=5))
            b._sweep()
            with pytest.raises(QueueDelay):
                await old[0]
            held.release()
            (await ex.next_batch()).release()
            await asyncio.gather(old[1], new)

    run(main())


def test_under_overload_a_higher_priority_is_admitted_and_served_first():
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)
            low = [b.submit(job(clock, timeout=2)) for _ in range(12)]
            held = await ex.next_batch()
            with pytest.raises(PredictedLate):
                b.submit(job(clock, timeout=1))
            high = b.submit(job(clock, timeout=1, priority=5))  # only the running work is ahead
            held.release()
            nxt = await ex.next_batch()
            assert nxt.jobs[0].future is high
            nxt.release()
            assert isinstance(await high, JobResult)
            await serve(ex, low)
            outcomes = await asyncio.gather(*low, return_exceptions=True)
            # the low ones are served or refused honestly; none is answered late
            assert all(isinstance(r, (JobResult, PredictedLate, DeadlineExceeded))
                       for r in outcomes)

    run(main())


# -- fair share ----------------------------------------------------------------------------
def _as_client(b: Batcher, clock: FakeClock, client: str, timeout: float = 1.0) -> asyncio.Future:
    """Submit as ``client`` would through the HTTP path: admit with its hint, then submit,
    in one task context."""
    ctx = __import__("contextvars").copy_context()
    hint = Hint("relu", 1000, clock.t + timeout, 0, client, True)

    def both():
        b.admit(hint)
        return b.submit(job(clock, timeout=timeout))

    return ctx.run(both)


def test_a_flooding_client_gets_429_first_and_the_quiet_one_is_served():
    async def main():
        clock = FakeClock()
        async with scheduler(clock, fair_share=True) as (b, ex):
            await warm(b, ex, clock)
            flood, refused = [], []
            for _ in range(20):
                try:
                    flood.append(_as_client(b, clock, "addr:noisy"))
                except ClientShare as exc:
                    refused.append(exc)
            assert refused and refused[0].status == 429
            quiet = _as_client(b, clock, "addr:quiet")  # within its share: admitted
            await serve(ex, [*flood, quiet])
            assert isinstance(await quiet, JobResult)
            await asyncio.gather(*flood)

    run(main())


def test_without_fair_share_the_client_is_not_counted():
    async def main():
        clock = FakeClock()
        async with scheduler(clock) as (b, ex):
            await warm(b, ex, clock)
            futs = [_as_client(b, clock, "addr:noisy") for _ in range(6)]
            assert b.admission.clients == {}
            await serve(ex, futs)
            await asyncio.gather(*futs)

    run(main())


def test_the_hint_is_kept_for_the_same_task_only():
    assert CURRENT.get() is None
    h = hint_from("relu", {}, {"content-type": "application/json", "content-length": "800",
                               "authorization": "Bearer k"}, "1.2.3.4", 0.0, 30.0, api="v2")
    assert h.elements == 100 and h.deadline == 30.0 and not h.timed
    assert h.client.startswith("key:")


def test_the_default_clock_is_the_deadlines_clock():
    b = Batcher(Settings(), ExecutorPool([], REGISTRY, Capabilities()))
    assert b.clock is time.monotonic


def test_v1_stats_shows_the_queue_discipline_and_backlog():
    import httpx

    from .conftest import serve

    with serve() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        overload = c.get("/v1/stats").json()["overload"]
    assert overload["discipline"] in ("fifo", "controlled_delay", "adaptive_lifo"), overload
    assert overload["switches"] == 0 and overload["backlog_s"] >= 0


# -- the engine process: the worker refuses before the body, from the engine's answers -----
def test_the_engines_predicted_wait_drains_with_time_and_bounds_from_below():
    clock = FakeClock()
    seen = RemoteWait(Settings(overload_safety=1.0), clock)
    soon = Hint("gelu", 1 << 18, deadline=clock.t + 0.5)
    seen.check(soon)  # nothing seen yet: no bound
    seen.observe(2.0)  # the engine's queue: 2 s of work ahead of a new request
    with pytest.raises(PredictedLate) as refused:
        seen.check(soon)
    assert refused.value.retry_after == 2  # 1.5 s over, in whole seconds
    seen.check(Hint("gelu", 1 << 18, deadline=clock.t + 2.5))  # fits
    seen.check(Hint("gelu", 1 << 18, deadline=clock.t + 0.5, priority=1))  # may pass it
    seen.check(None)
    clock.t += 1.6  # drained at a second a second: 0.4 s left
    seen.check(Hint("gelu", 1 << 18, deadline=clock.t + 0.5))
    with pytest.raises(PredictedLate):
        seen.check(Hint("gelu", 1 << 18, deadline=clock.t + 0.3))
    seen.observe(0.0)  # an answer from an empty queue
    seen.check(Hint("gelu", 1 << 18, deadline=clock.t + 0.01))
    off = RemoteWait(Settings(overload_admission=False), clock)
    off.observe(60.0)
    off.check(soon)


def test_a_worker_refuses_before_the_body_from_the_wait_on_the_engines_answers():
    """``RemoteEngine.admit`` with a hint: the wait the engine process put on its last
    answer (``Done`` or ``Error``, even one for a job this worker no longer holds)."""
    clock = FakeClock()
    eng = RemoteEngine(Settings(overload_safety=1.0))
    eng._ready = True
    eng._engine_wait.clock = clock
    late = Hint("gelu", 1 << 18, deadline=clock.t + 0.5)
    eng.admit(late)
    eng._on_message(messages.Done(99, "float32", (4,), 0.0, 1, 4, "cpu", 0.0, {}, None, None,
                                  {}, 3.0))
    with pytest.raises(PredictedLate):
        eng.admit(late)
    eng.admit(Hint("gelu", 1 << 18, deadline=clock.t + 5.0))
    eng.admit()  # no hint (a small body, or submit's own count check): no prediction
    eng._on_message(messages.Error(98, "predicted_late", "late", None, 0.0))
    eng.admit(late)


def test_the_engine_process_overload_state_reaches_one_workers_metrics():
    """``State.overload``: the engine's discipline, switches and prediction errors, shown
    by the first worker only (the workers' numbers are summed into one server's)."""
    from service.observability.metrics import Metrics

    snapshot = Admission(Settings(), FakeClock()).snapshot()
    snapshot["prediction_error"]["buckets"] = list(snapshot["prediction_error"]["buckets"])
    snapshot.update(discipline="controlled_delay", switches=3)
    state = messages.State(True, "", False, ["cpu"], [], 0, 5, snapshot)
    import msgspec

    wire = messages.for_worker(memoryview(msgspec.msgpack.encode(state)))
    assert wire.overload == snapshot  # as the channel carries it
    eng = RemoteEngine(Settings())
    assert eng.overload() == {}
    eng._on_message(state)
    assert eng.overload()["discipline"] == "controlled_delay"

    def scrape(engine) -> str:
        m = Metrics(["gelu"])
        m.track_overload(engine.overload)
        return m.exposition().decode()

    assert "actserve_queue_discipline 1.0" in scrape(eng)
    assert "actserve_queue_discipline_switches_total 3.0" in scrape(eng)
    eng.shows_overload = False  # a worker other than the first
    assert "\nactserve_queue_discipline " not in scrape(eng)  # the family, no sample


def test_the_engine_is_busy_while_a_new_request_would_wait_past_the_target():
    """``Batcher.busy``: the HTTP protocol's cue to check admission before the
    application (a new request's predicted wait over the target, or the queue full)."""
    async def main():
        clock = FakeClock()
        async with scheduler(clock, overload_target_delay_ms=50, overload_interval_ms=100,
                             max_queue_requests=20) as (b, ex):
            await warm(b, ex, clock)  # 1,000 elements cost 0.1 s
            assert not b.busy()  # nothing queued: no sums made
            futs = [b.submit(job(clock, timeout=5))]
            held = await ex.next_batch()  # one running, nothing queued: not busy
            assert not b.busy()
            futs.append(b.submit(job(clock, timeout=5)))  # 0.1 s queued ahead of a new one
            assert b.busy()
            futs += [b.submit(job(clock, timeout=5)) for _ in range(19)]
            assert b.busy() and b.waiting == 20  # the queue is full
            held.release()
            await serve(ex, futs)
            await asyncio.gather(*futs)
            assert not b.busy()

    run(main())


def test_a_workers_view_of_the_engine_is_busy_until_its_wait_drains():
    clock = FakeClock()
    w = RemoteWait(Settings(overload_target_delay_ms=50), clock)
    assert not w.busy()
    w.observe(0.2)
    assert w.busy()
    clock.t += 0.16  # 40 ms left of the 200: under the target
    assert not w.busy()
    assert not RemoteWait(Settings(overload_admission=False), clock).busy()
