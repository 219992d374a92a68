"""Deterministic concurrency for tests: hold a server's compute thread until the requests
under test are all queued, so batches form exactly when the test says."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager


def block_executor(runtime, index: int = 0):
    """Occupy executor ``index``'s compute thread until the returned event is set."""
    gate = threading.Event()
    started = threading.Event()

    def hold(_compute):
        started.set()
        gate.wait(60)

    runtime.pool.executors[index].call(hold)
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
async def held(runtime, expected_jobs: int, index: int = 0):
    """Inside the block, start requests; on exit the gate opens once ``expected_jobs`` more
    jobs have reached the batcher."""
    base = runtime.batcher.submitted
    gate = block_executor(runtime, index)
    try:
        yield
        await wait_for(lambda: runtime.batcher.submitted - base >= expected_jobs)
    finally:
        gate.set()
