"""Deterministic concurrency for tests: hold a server's compute thread until the requests
under test are all queued, so batches form exactly when the test says."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from contextlib import asynccontextmanager


class Submissions:
    """Counts the jobs an engine's batcher accepted, by wrapping that instance's ``submit``
    (test side only; the production classes carry no counters for tests)."""

    def __init__(self, engine) -> None:
        self.count = 0
        inner = engine.batcher.submit

        def submit(job):
            future = inner(job)  # raises when refused: not counted
            self.count += 1
            return future

        engine.batcher.submit = submit


_SUBMISSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def submissions(engine) -> Submissions:
    """The one counter of ``engine`` (installed on first use)."""
    counter = _SUBMISSIONS.get(engine.batcher)
    if counter is None:
        counter = _SUBMISSIONS[engine.batcher] = Submissions(engine)
    return counter


def block_executor(engine, index: int = 0):
    """Occupy executor ``index``'s compute thread until the returned event is set."""
    gate = threading.Event()
    started = threading.Event()

    def hold(_compute):
        started.set()
        gate.wait(60)

    engine.pool.executors[index].call(hold)
    if not started.wait(30):
        raise RuntimeError("compute thread did not pick up the gate")
    return gate


async def wait_for(predicate, timeout: float = 30.0) -> None:
    """Wait for a condition another thread makes true (polls; bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def held(engine, expected_jobs: int, index: int = 0):
    """Inside the block, start requests; on exit the gate opens once ``expected_jobs`` more
    jobs have reached the batcher."""
    counter = submissions(engine)
    base = counter.count
    gate = block_executor(engine, index)
    try:
        yield
        await wait_for(lambda: counter.count - base >= expected_jobs)
    finally:
        gate.set()


class FakeClock:
    """A clock tests move by hand (``clock.t += 0.5``): deadlines, intervals and
    heartbeats without waiting."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
