"""What the scheduler (``Batcher``, ``ExecutorPool``) needs of an executor, and nothing more.

``executor.Executor`` (one torch compute thread per device) is the production one; the
scheduler's tests drive ``Batcher`` and ``ExecutorPool`` with a fake that satisfies this
protocol. Torch-free.

Threading contract: ``start``, ``submit``, ``call`` and ``stop`` are called from the event
loop (``stop`` may block, so the pool runs it in a worker thread). The executor reports back
on the loop only: ``on_done(executor, jobs, results, wall_s)`` once per submitted batch, in
submission order, with one ``JobResult`` or exception per job; ``on_death(executor, jobs,
exc)`` when it can compute no more, once for each batch it still held (``jobs`` may be empty).
The pool, not the executor, decrements ``inflight_batches``/``inflight_elements`` in those
callbacks; ``submit`` increments them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.engine.job import Job, JobResult

BatchDone = Callable[["ExecutorLike", "list[Job]", "list[JobResult | Exception]", float], None]
Death = Callable[["ExecutorLike", "list[Job]", BaseException], None]


class ExecutorLike(Protocol):
    device: str  # e.g. "cpu", "cuda:0"
    index: int  # stable position in the pool; a restarted executor keeps it
    alive: bool  # True from ``start`` until it dies or stops
    inflight_batches: int  # loop-side bookkeeping, see the module docstring
    inflight_elements: int
    memory_allocated: int  # bytes on the device (0 where not measured)
    memory_peak: int

    def start(self, loop: asyncio.AbstractEventLoop, on_done: BatchDone, on_death: Death) -> None:
        """Begin taking work; report through ``on_done``/``on_death`` on ``loop``."""

    def submit(self, batch: list[Job]) -> None:
        """Compute ``batch`` (compatible jobs) after the batches submitted before it."""

    def call(self, fn: Callable[[Any], object]) -> concurrent.futures.Future:
        """Run ``fn(compute)`` where the executor computes (start-up probe, self-test)."""

    def stop(self) -> None:
        """Stop after the work already submitted; may block."""


# Makes a fresh executor to replace a dead one (same device and index).
ExecutorFactory = Callable[[ExecutorLike], ExecutorLike]
