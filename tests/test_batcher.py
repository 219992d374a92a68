"""The scheduler alone: ``Batcher`` + ``ExecutorPool`` driven by fake executors.

No server, no threads, no torch compute, no polling and no sleeps: a fake executor hands
each batch it receives to the test and finishes it only when the test sets that batch's
``asyncio.Event`` (with results, or with the executor's death). Every test checks, on the
way out, that every future ``submit`` handed out was resolved exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.engine.activations import Registry
from service.engine.batcher import Batcher
from service.engine.capabilities import Capabilities
from service.engine.job import Job, JobResult, Mode
from service.engine.pool import ExecutorPool
from service.errors import (
    ComputeError,
    DeadlineExceeded,
    Draining,
    NotReady,
    QueueFull,
    Unavailable,
)
from service.settings import Settings

REGISTRY = Registry()
PLAIN = Mode(None, False, None, False)
TEST_TIMEOUT_S = 10  # a scheduler bug hangs a test; this turns it into a failure


@dataclass(eq=False)
class Held:
    """One batch inside a fake executor, finished when ``go`` is set."""

    jobs: list[Job]
    go: asyncio.Event = field(default_factory=asyncio.Event)
    results: list | None = None
    death: BaseException | None = None

    def release(self, results: list | None = None) -> None:
        self.results = results
        self.go.set()

    def kill(self, exc: BaseException | None = None) -> None:
        self.death = exc or RuntimeError("the fake compute thread died")
        self.go.set()


class FakeExecutor:
    """Satisfies ``ExecutorLike`` (service/engine/executor_protocol.py)."""

    def __init__(self, index: int, device: str = "fake") -> None:
        self.device, self.index = device, index
        self.alive = False
        self.inflight_batches = 0
        self.inflight_elements = 0
        self.memory_allocated = self.memory_peak = 0
        self.batches: list[Held] = []
        self.arrived: asyncio.Queue[Held] = asyncio.Queue()
        self.calls = 0
        self.stopped = False
        self._tasks: set[asyncio.Task] = set()

    def start(self, loop, on_done, on_death) -> None:
        self.loop, self.on_done, self.on_death = loop, on_done, on_death
        self.alive = True

    def submit(self, batch: list[Job]) -> None:
        self.inflight_batches += 1
        self.inflight_elements += sum(j.numel for j in batch)
        held = Held(list(batch))
        self.batches.append(held)
        self.arrived.put_nowait(held)
        task = self.loop.create_task(self._finish(held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, held: Held) -> None:
        await held.go.wait()
        if held.death is not None:
            self.on_death(self, held.jobs, held.death)
            return
        results = held.results
        if results is None:
            elements = sum(j.numel for j in held.jobs)
            results = [JobResult(j.array, j.wire_dtype, 0.0, len(held.jobs), elements, self.device)
                       for j in held.jobs]
        self.on_done(self, held.jobs, results, 0.001)

    def call(self, fn) -> concurrent.futures.Future:
        self.calls += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(self))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, like Executor.call
            fut.set_exception(exc)
        return fut

    def stop(self) -> None:
        self.alive = False
        self.stopped = True

    async def next_batch(self) -> Held:
        return await self.arrived.get()

    def computed(self) -> list[Job]:
        return [j for held in self.batches for j in held.jobs]


class Tracker:
    """Every future the batcher hands out, and how many times each was resolved."""

    def __init__(self, batcher: Batcher) -> None:
        self.futures: list[asyncio.Future] = []
        self.resolutions: dict[int, int] = {}
        inner = batcher.submit

        def submit(job: Job) -> asyncio.Future:
            fut = inner(job)
            self.futures.append(fut)
            self.resolutions[id(fut)] = 0
            fut.add_done_callback(lambda f: self.resolutions.__setitem__(id(f), self.resolutions[id(f)] + 1))
            return fut

        batcher.submit = submit

    def check(self) -> None:
        assert all(f.done() for f in self.futures), "a future was never resolved"
        assert set(self.resolutions.values()) <= {1}, self.resolutions


@dataclass
class Harness:
    batcher: Batcher
    pool: ExecutorPool
    executors: list[FakeExecutor]
    replacements: list[FakeExecutor]
    ready_changes: list[bool]
    ready_event: asyncio.Event

    @property
    def ex(self) -> FakeExecutor:
        return self.executors[0]

    def submit(self, job: Job) -> asyncio.Future:
        return self.batcher.submit(job)


def job(n: int = 4, *, activation: str = "relu", priority: int = 0, timeout: float = 60.0) -> Job:
    act = REGISTRY.get(activation)
    return Job(activation=act, params=act.parse_params({}), array=np.arange(n, dtype=np.float32),
               wire_dtype="float32", mode=PLAIN, deadline=time.monotonic() + timeout,
               priority=priority)


@asynccontextmanager
async def scheduler(executors: int = 1, *, restart_limit: int = 5, problems: tuple = (), **settings):
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    fakes = [FakeExecutor(i) for i in range(executors)]
    replacements: list[FakeExecutor] = []

    def fresh(dead):
        new = FakeExecutor(dead.index, dead.device)
        replacements.append(new)
        return new

    pool = ExecutorPool(fakes, REGISTRY, Capabilities(), restart_limit=restart_limit,
                        new_executor=fresh, probe=lambda compute, registry: {},
                        self_test=lambda compute, registry, capabilities: list(problems))
    changes: list[bool] = []
    ready_event = asyncio.Event()

    def on_readiness(ready: bool) -> None:
        changes.append(ready)
        if ready:
            ready_event.set()

    pool.on_readiness_change = on_readiness
    batcher = Batcher(Settings(**settings), pool)
    tracker = Tracker(batcher)
    await batcher.start()
    try:
        yield Harness(batcher, pool, fakes, replacements, changes, ready_event)
    finally:
        for ex in pool.executors:
            for held in ex.batches:
                held.go.set()
        await batcher.stop()
    tracker.check()
    assert all(ex.stopped for ex in pool.executors)
    assert loop_errors == []


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


async def raised(fut: asyncio.Future) -> BaseException:
    with pytest.raises(BaseException) as info:
        await fut
    return info.value


# -- batch formation ------------------------------------------------------------------------
def test_a_lone_request_runs_at_once_with_its_own_answer():
    async def main():
        async with scheduler() as h:
            j = job(5)
            fut = h.submit(j)
            held = await h.ex.next_batch()
            assert held.jobs == [j]
            assert h.ex.inflight_batches == 1 and h.ex.inflight_elements == 5
            held.release()
            result = await fut
            assert result.array is j.array and result.batch_requests == 1
            assert result.queue_s == j.t_dispatch - j.t_enqueue > 0
            assert (h.ex.inflight_batches, h.ex.inflight_elements) == (0, 0)
            assert h.batcher.waiting == 0

    run(main())


def test_while_busy_every_compatible_job_joins_one_batch_in_order():
    async def main():
        async with scheduler() as h:
            first = job()
            futs = [h.submit(first)]
            head = await h.ex.next_batch()
            same = [job(n) for n in (1, 2, 3)]
            other = job(activation="sigmoid")
            futs += [h.submit(same[0]), h.submit(other), h.submit(same[1]), h.submit(same[2])]
            assert h.batcher.waiting == 4
            head.release()
            second = await h.ex.next_batch()
            assert second.jobs == same  # the oldest job's key, every compatible job behind it
            second.release()
            third = await h.ex.next_batch()
            assert third.jobs == [other]
            third.release()
            results = await asyncio.gather(*futs)
            assert [r.batch_requests for r in results] == [1, 3, 1, 3, 3]

    run(main())


def test_max_batch_requests_splits_a_queue():
    async def main():
        async with scheduler(max_batch_requests=2) as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            waiting = [job() for _ in range(5)]
            futs += [h.submit(j) for j in waiting]
            head.release()
            sizes = []
            for _ in range(3):
                held = await h.ex.next_batch()
                sizes.append(len(held.jobs))
                held.release()
            await asyncio.gather(*futs)
            assert sizes == [2, 2, 1]
            assert h.ex.computed()[1:] == waiting

    run(main())


def test_max_batch_elements_closes_a_batch_before_the_job_that_would_overflow_it():
    async def main():
        async with scheduler(max_batch_elements=100) as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            futs += [h.submit(job(n)) for n in (60, 30, 20, 50, 100)]
            head.release()
            batches = []
            for _ in range(3):
                held = await h.ex.next_batch()
                batches.append([j.numel for j in held.jobs])
                held.release()
            await asyncio.gather(*futs)
            assert batches == [[60, 30], [20, 50], [100]]

    run(main())


def test_higher_priority_goes_first_then_the_oldest():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            low_a = job(activation="relu")
            low_b = job(activation="tanh")
            high = job(activation="sigmoid", priority=5)
            futs += [h.submit(low_a), h.submit(low_b), h.submit(high)]
            head.release()
            order = []
            for _ in range(3):
                held = await h.ex.next_batch()
                order.append(held.jobs)
                held.release()
            await asyncio.gather(*futs)
            assert order == [[high], [low_a], [low_b]]

    run(main())


# -- deadlines, overload, drain ------------------------------------------------------------
def test_a_deadline_already_past_is_refused_at_submit():
    async def main():
        async with scheduler() as h:
            with pytest.raises(DeadlineExceeded) as info:
                h.submit(job(timeout=-1))
            assert info.value.status == 504
            assert h.batcher.waiting == 0 and h.ex.batches == []

    run(main())


def test_a_job_that_expires_while_waiting_gets_504_and_is_never_computed():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            late, kept = job(), job(activation="tanh")
            late_fut = h.submit(late)
            futs.append(h.submit(kept))
            late.deadline = time.monotonic() - 1  # its deadline passes while it waits
            err = await raised(late_fut)
            assert isinstance(err, DeadlineExceeded) and err.status == 504
            assert h.batcher.waiting == 1
            head.release()
            nxt = await h.ex.next_batch()
            assert nxt.jobs == [kept]
            nxt.release()
            await asyncio.gather(*futs)
            assert late not in h.ex.computed()

    run(main())


def test_a_full_queue_refuses_with_503_until_a_slot_frees():
    async def main():
        async with scheduler(max_queue_requests=3, max_batch_requests=1) as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()  # dispatched: no longer waiting
            futs += [h.submit(job()) for _ in range(3)]
            with pytest.raises(QueueFull) as info:
                h.submit(job())
            assert info.value.status == 503 and info.value.retry_after == 1
            with pytest.raises(QueueFull):
                h.batcher.admit()
            head.release()
            nxt = await h.ex.next_batch()  # one waiting job taken: a slot is free
            futs.append(h.submit(job()))
            nxt.release()
            for _ in range(3):
                held = await h.ex.next_batch()
                held.release()
            await asyncio.gather(*futs)
            assert len(h.ex.computed()) == 5

    run(main())


def test_drain_refuses_new_work_and_finishes_what_was_accepted():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            futs.append(h.submit(job(activation="tanh")))
            h.batcher.begin_drain()  # what SIGTERM does first, then drain()
            drained = asyncio.ensure_future(h.batcher.drain())
            with pytest.raises(Draining) as info:
                h.submit(job())
            assert info.value.status == 503
            head.release()
            nxt = await h.ex.next_batch()  # accepted work still runs while draining
            assert not drained.done()
            nxt.release()
            await drained
            assert all(f.done() and not f.exception() for f in futs)

    run(main())


def test_stop_answers_waiting_jobs_503_and_stops_the_executors():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            await h.ex.next_batch()
            waiting = h.submit(job(activation="tanh"))
            await h.batcher.stop()
            err = await raised(waiting)
            assert isinstance(err, Unavailable) and err.status == 503
            assert h.ex.stopped and len(h.ex.computed()) == 1
            with pytest.raises(Draining):
                h.submit(job())
            h.ex.batches[0].release()
            await futs[0]

    run(main())


def test_an_abandoned_job_frees_its_slot_and_is_never_computed():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            gone, kept = job(), job()
            gone_fut = h.submit(gone)
            futs.append(h.submit(kept))
            h.batcher.abandon(gone)
            assert gone_fut.cancelled() and h.batcher.waiting == 1
            head.release()
            nxt = await h.ex.next_batch()
            assert nxt.jobs == [kept]
            nxt.release()
            await asyncio.gather(*futs)

    run(main())


# -- failures ------------------------------------------------------------------------------
def test_a_compute_error_fails_that_job_alone():
    async def main():
        async with scheduler() as h:
            futs = [h.submit(job())]
            head = await h.ex.next_batch()
            a, b, c = job(), job(), job()
            fa, fb, fc = h.submit(a), h.submit(b), h.submit(c)
            head.release()
            held = await h.ex.next_batch()
            ok = JobResult(a.array, "float32", 0.0, 3, 12, "fake")
            held.release([ok, ComputeError("compute failed: boom"), RuntimeError("odd")])
            assert (await fa) is ok
            err_b, err_c = await raised(fb), await raised(fc)
            assert isinstance(err_b, ComputeError) and err_b.status == 500
            assert isinstance(err_c, Unavailable)  # a non-actserve error is wrapped
            await futs[0]

    run(main())


def test_executor_death_answers_its_batch_and_the_queue_503_then_a_fresh_one_serves():
    async def main():
        async with scheduler() as h:
            dead = h.ex
            held_fut = h.submit(job())
            held = await dead.next_batch()
            waiting_fut = h.submit(job(activation="tanh"))
            h.ready_event.clear()
            held.kill()
            for fut in (held_fut, waiting_fut):
                err = await raised(fut)
                assert isinstance(err, Unavailable) and err.status == 503
            await h.ready_event.wait()  # the replacement passed its start-up checks
            assert h.ready_changes == [True, False, True]
            assert h.pool.restarts == 1 and not dead.alive
            (fresh,) = h.replacements
            assert h.pool.executors == [fresh] and fresh.index == dead.index
            assert fresh.calls == 2  # probe and self-test ran in the new executor
            fut = h.submit(job())
            nxt = await fresh.next_batch()
            nxt.release()
            await fut
            assert len(dead.computed()) == 1  # the waiting job was answered, not computed

    run(main())


def test_past_the_restart_limit_the_pool_stays_not_ready():
    async def main():
        async with scheduler(restart_limit=0) as h:
            fut = h.submit(job())
            (await h.ex.next_batch()).kill()
            assert isinstance(await raised(fut), Unavailable)
            assert not h.pool.ready and h.replacements == [] and h.pool.restarts == 0
            with pytest.raises(NotReady) as info:
                h.submit(job())
            assert info.value.status == 503

    run(main())


def test_with_two_executors_a_death_leaves_the_queue_to_the_other():
    async def main():
        async with scheduler(executors=2, restart_limit=0) as h:
            ex0, ex1 = h.executors
            f0 = h.submit(job())
            b0 = await ex0.next_batch()  # both idle and equally loaded: the first
            f1 = h.submit(job(activation="tanh"))
            b1 = await ex1.next_batch()  # ex0 is busy: the other one
            waiting = h.submit(job(activation="sigmoid"))
            b0.kill()
            assert isinstance(await raised(f0), Unavailable)
            assert h.pool.ready  # ex1 is alive: the waiting job stays queued
            assert not waiting.done() and h.batcher.waiting == 1
            b1.release()
            nxt = await ex1.next_batch()
            nxt.release()
            await asyncio.gather(f1, waiting)
            assert len(ex0.computed()) == 1

    run(main())


def test_a_failed_self_test_keeps_the_pool_not_ready():
    async def main():
        async with scheduler(problems=("relu/float32: batched result differs for size 7",)) as h:
            assert not h.pool.ready
            assert h.pool.selftest_problems == ["relu/float32: batched result differs for size 7"]
            with pytest.raises(NotReady):
                h.submit(job())
            assert h.ex.batches == []

    run(main())
