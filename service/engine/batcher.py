"""The batcher: one asyncio owner task, one bounded queue, greedy batching.

Invariant: every future handed out by ``submit`` is resolved exactly once, on every path:
a result, a ``ComputeError`` (that request failed alone), ``DeadlineExceeded`` (it waited
past its deadline and was never computed), ``Unavailable`` (its executor died, or the
server stopped without an executor). Cancelled futures (the client went away) are skipped
before compute and never resolved again.

``submit`` never waits: it raises ``QueueFull``/``Draining``/``NotReady`` at once.

Policy: whenever an executor is idle, the owner takes the highest-priority, oldest waiting
job and every compatible job (same batch key) behind it, up to ``max_batch_requests`` and
``max_batch_elements``. With ``max_delay_us=0`` a lone request runs at once; under load
batches form by themselves while the executor is busy. ``max_delay_us>0`` holds a batch
that is not yet full open that long to let it grow.

Overload (``admission.py``): ``admit`` and ``submit`` predict when a request would finish
from the measured service model and the work queued ahead of it, and refuse at once one
that would be late (or over the cap while the queue is overloaded, or over its client's
share); ``_take`` sheds a head job that could no longer finish by its deadline and, while
overloaded with ``overload_lifo``, serves the newest batch first; a job computed after its
deadline is answered 504, never 200. Every time here is read from ``clock`` (a fake one in
tests).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable

from service.engine.admission import CURRENT, Admission, Entry, Hint, PredictedLate, QueueDelay
from service.engine.executor_protocol import ExecutorLike
from service.engine.job import Job, JobResult
from service.engine.pool import ExecutorPool
from service.errors import (
    ActserveError,
    DeadlineExceeded,
    Draining,
    NotReady,
    QueueFull,
    Unavailable,
)
from service.settings import Settings

SWEEP_S = 0.005  # deadline resolution: a job is answered 504 at most this late
_EXPIRED = "the request's deadline passed while it waited in the queue; it was not computed"
_NEVER = Entry(0.0, 0, None, float("inf"), 0.0)  # for a job without an entry
_LATE = "the request was computed after its deadline; its answer was dropped"
_SHED_LATE = ("the request could no longer finish by its deadline when its turn came; it was "
              "not computed")
_SHED_WAIT = ("the queue is overloaded and serves the newest requests first; this one waited "
              "past the cap and was not computed")

BatchObserver = Callable[[list[Job], list, float], None]


def _resolve(job: Job, result: JobResult | None = None, error: Exception | None = None) -> bool:
    fut = job.future
    if fut is None or fut.done():
        return False
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
    return True


def _release_result(res: JobResult) -> None:
    if res.release is not None:
        res.release()
        res.release = None


class Batcher:
    def __init__(self, settings: Settings, pool: ExecutorPool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pool = pool
        self.clock = clock  # the deadlines' clock (time.monotonic; a fake one in tests)
        self.admission = Admission(settings, clock)
        self._entries: dict[Job, Entry] = {}  # queued jobs, oldest first
        self._taken_cost = 0.0  # the predicted seconds of the batch ``_take`` returned
        # priority -> batch key -> FIFO of jobs
        self._levels: dict[int, dict[tuple, deque[Job]]] = {}
        self._waiting = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._draining = False
        self._stopped = False
        self.on_batch: BatchObserver | None = None

    # -- public -----------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        await self.pool.start(self._batch_done, self._batch_lost)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="actserve-batcher")

    def admit(self, hint: Hint | None = None) -> None:
        """Raise what ``submit`` would raise for overload, before a body is even read, so
        that refusals stay cheap when the server is busiest. With a ``hint`` (what the
        request's headers say) the predicted finish and the client's share are checked
        too; the hint is kept for this task's ``submit``."""
        self._admit_basic()
        if hint is None:
            return
        CURRENT.set(hint)
        if hint.deadline is not None:
            cost = self.admission.model.predict(hint.activation, hint.elements)
            self.admission.check(cost, hint.deadline, hint.priority, hint.client)

    def busy(self) -> bool:
        """``admit`` may refuse now (queue full, or the predicted wait above the target)."""
        if not self._waiting:
            return False  # nothing queued (the hot path at low load: no sums)
        a = self.admission
        return (self._waiting >= self.settings.max_queue_requests
                or (a.enabled and a.wait_ahead(0) > a.target))

    def _admit_basic(self) -> None:
        if self._draining or self._stopped:
            raise Draining("the server is shutting down; retry on another replica")
        if not self.pool.ready:
            raise NotReady("the server is not ready (warming up or restarting its executor)")
        if self._waiting >= self.settings.max_queue_requests:
            raise QueueFull(
                f"the queue is full ({self.settings.max_queue_requests} requests waiting); retry"
            )

    def submit(self, job: Job) -> asyncio.Future:
        self._admit_basic()
        hint = CURRENT.get()
        if hint is not None and hint.timed and hint.deadline < job.deadline:
            job.deadline = hint.deadline  # counted from the request's arrival
        now = self.clock()
        if job.deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before it could be queued")
        a = self.admission
        cost = a.model.predict(job.activation.name, job.array.size)
        client = hint.client if hint is not None else None
        wait = a.check(cost, job.deadline, job.priority, client, now)
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.seq = next(self._seq)
        job.t_enqueue = time.perf_counter()
        self._entries[job] = a.queued(cost, job.priority, client, wait, now)
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)
        self._levels.setdefault(-job.priority, {}).setdefault(job.key, deque()).append(job)
        self._waiting += 1
        self._wakeup.set()
        return job.future

    def begin_drain(self) -> None:
        """Refuse new work from now on (503); accepted work still completes."""
        self._draining = True

    async def drain(self) -> None:
        """Stop accepting; wait until every accepted job is answered."""
        self._draining = True
        while self._waiting or self.pool.busy():
            self._wakeup.set()
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._draining = True
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for job in self._pop_all():
            _resolve(job, error=Unavailable("the server stopped before computing this request"))
        await self.pool.stop()

    # -- owner task ---------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self.settings.max_delay_us / 1e6
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            executor = await self.pool.wait_idle()
            if delay and self._waiting < self.settings.max_batch_requests:
                await asyncio.sleep(delay)
            batch = self._take()
            if batch:
                self._dispatch(executor, batch)

    def _take(self) -> list[Job]:
        """Pop the head job (highest priority, oldest; newest while overloaded with
        ``overload_lifo``) and its compatible followers; then show the discipline the
        standing delay (the oldest job still waiting)."""
        self._sync_executors()
        batch = self._take_batch()
        self._observe_delay(self.clock())
        return batch

    def _take_batch(self) -> list[Job]:
        s = self.settings
        a = self.admission
        now = self.clock()
        lifo = a.overloaded and a.lifo
        while self._levels:
            level = min(self._levels)
            queues = self._levels[level]
            if lifo:
                key = max(queues, key=lambda k: queues[k][-1].seq)
            else:
                key = min(queues, key=lambda k: queues[k][0].seq)
            q = queues[key]
            batch: list[Job] = []
            elements = 0
            batch_cost = 0.0
            while q and len(batch) < s.max_batch_requests:
                job = q[-1] if lifo else q[0]
                n = job.array.size
                if batch and elements + n > s.max_batch_elements:
                    break
                q.pop() if lifo else q.popleft()
                self._waiting -= 1
                entry = self._entries.pop(job, None)
                if entry is not None:
                    a.left(entry)
                if job.future.done():  # cancelled by its client: skip, never compute
                    continue
                if job.deadline <= now:  # expired since the last sweep: never compute
                    _resolve(job, error=DeadlineExceeded(_EXPIRED))
                    continue
                if entry is not None:
                    if a.enabled and now + batch_cost + entry.cost > job.deadline:
                        # it would finish late: never compute it, say so now
                        _resolve(job, error=PredictedLate(_SHED_LATE))
                        continue
                    batch_cost += entry.cost
                    a.waited(entry, now)
                batch.append(job)
                elements += n
            if not q:
                del queues[key]
                if not queues:
                    del self._levels[level]
            if batch:
                self._taken_cost = batch_cost
                return batch
        return []

    def _dispatch(self, executor: ExecutorLike, batch: list[Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            job.t_dispatch = now
        self.admission.started(executor, self._taken_cost)
        executor.submit(batch)

    def _sync_executors(self) -> None:
        """The executors that share the queued work (once a batch: the count changes only
        when one dies or is restarted)."""
        self.admission.executors = sum(1 for e in self.pool.executors if e.alive) or 1

    def _observe_delay(self, now: float) -> None:
        """The oldest waiting job's wait (the standing delay) for the discipline."""
        oldest = None
        for entry in self._entries.values():  # insertion order: the first is the oldest
            oldest = entry.t_in
            break
        self.admission.observe_delay(None if oldest is None else now - oldest)

    def _pop_all(self) -> list[Job]:
        jobs = [j for queues in self._levels.values() for q in queues.values() for j in q]
        self._levels.clear()
        self._waiting = 0
        self._entries.clear()
        self.admission.clear()
        return jobs

    def abandon(self, job: Job) -> None:
        """The client went away: free its queue slot now and never compute it. A job
        already dispatched finishes; its answer is dropped."""
        self._unqueue(job)
        if job.future is not None and not job.future.done():
            job.future.cancel()

    def _unqueue(self, job: Job) -> bool:
        queues = self._levels.get(-job.priority)
        q = queues.get(job.key) if queues else None
        if q is None or job not in q:
            return False  # already dispatched (or never queued)
        q.remove(job)
        self._waiting -= 1
        entry = self._entries.pop(job, None)
        if entry is not None:
            self.admission.left(entry)
        if not q:
            del queues[job.key]
            if not queues:
                del self._levels[-job.priority]
        return True

    # -- callbacks ----------------------------------------------------------------------
    def _sweep(self) -> None:
        """Answer 504 to every waiting job whose deadline has passed. One timer for the
        whole queue, every ``SWEEP_S`` while jobs wait (no timer per job); ``_take`` also
        drops jobs that expired since the last sweep, so none is computed late."""
        self._sweeper = None
        now = self.clock()
        a = self.admission
        shed_before = now - a.max_wait if a.overloaded and a.lifo else None
        for level in list(self._levels):
            queues = self._levels[level]
            for key in list(queues):
                q = queues[key]
                expired = [j for j in q if j.deadline <= now or (
                    shed_before is not None and self._entries.get(j, _NEVER).t_in < shed_before)]
                for job in expired:
                    q.remove(job)
                    self._waiting -= 1
                    entry = self._entries.pop(job, None)
                    if entry is not None:
                        a.left(entry)
                    _resolve(job, error=DeadlineExceeded(_EXPIRED) if job.deadline <= now
                             else QueueDelay(_SHED_WAIT))
                if not q:
                    del queues[key]
            if not queues:
                del self._levels[level]
        if self._waiting:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _batch_done(self, ex: ExecutorLike, jobs: list[Job], results: list, wall: float) -> None:
        now = self.clock()
        ok = [j.numel for j, r in zip(jobs, results, strict=True) if isinstance(r, JobResult)]
        if jobs:
            self.admission.finished(ex, jobs[0].activation.name, ex.device,
                                    ok if len(ok) == len(jobs) else [], wall,
                                    self._waiting > 0)
        for job, res in zip(jobs, results, strict=True):
            if isinstance(res, JobResult):
                res.queue_s = job.t_dispatch - job.t_enqueue
                if now > job.deadline and self.admission.enabled:
                    _release_result(res)
                    _resolve(job, error=DeadlineExceeded(_LATE))  # never a 200 after it
                    continue
                _resolve(job, result=res)
            else:
                _resolve(job, error=res if isinstance(res, ActserveError) else Unavailable(str(res)))
        if self.on_batch is not None:
            self.on_batch(jobs, results, wall)
        self._wakeup.set()

    def _batch_lost(self, ex: ExecutorLike, jobs: list[Job], err: Exception) -> None:
        self.admission.lost(ex)
        self._sync_executors()
        for job in jobs:
            _resolve(job, error=err)
        if not any(e.alive for e in self.pool.executors):
            # Nothing can compute the waiting jobs now: answer them rather than let them
            # wait for a restart that may take a while (clients retry on 503).
            for job in self._pop_all():
                _resolve(job, error=Unavailable("the compute executor is restarting; retry"))
        self._wakeup.set()
