"""One compute thread per device: the only place torch runs.

The thread takes work from a plain ``queue.SimpleQueue`` and hands results back to the event loop
with ``loop.call_soon_threadsafe``; it never touches any other asyncio object. If the thread
dies (an exception escapes the loop below), ``on_death`` is scheduled on the event loop with
the batch it was holding, so the loop side can answer those waiters and start a new
executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from service.engine.compute import DeviceCompute
from service.engine.executor_protocol import BatchDone, Death
from service.engine.job import Job

_STOP = object()
MEMORY_READ_S = 0.25  # CUDA memory gauges: read at most this often (see _main)


class Executor:
    def __init__(
        self,
        device: str,
        *,
        index: int,
        torch_threads: int,
        fault_injection: bool = False,
    ) -> None:
        self.device = device
        self.index = index
        self.torch_threads = torch_threads
        self.fault_injection = fault_injection
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # C-level put/get: a cheaper hop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_done: BatchDone | None = None
        self._on_death: Death | None = None
        # Loop-side bookkeeping (touched only on the event loop).
        self.inflight_batches = 0
        self.inflight_elements = 0
        self.alive = False
        # Compute-side observation, read by metrics (plain ints: atomic under the GIL).
        self.memory_allocated = 0
        self.memory_peak = 0

    # -- loop side --------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, on_done: BatchDone, on_death: Death) -> None:
        self._loop, self._on_done, self._on_death = loop, on_done, on_death
        self.alive = True
        self._thread = threading.Thread(
            target=self._main, name=f"actserve-compute-{self.device}-{self.index}", daemon=True
        )
        self._thread.start()

    def submit(self, batch: list[Job]) -> None:
        self.inflight_batches += 1
        self.inflight_elements += sum(j.numel for j in batch)
        self._inbox.put(("batch", batch))

    def call(self, fn: Callable[[DeviceCompute], object]) -> concurrent.futures.Future:
        """Run ``fn(compute)`` in the compute thread (warm-up, probes)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, fut)))
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put((_STOP, None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.alive = False

    # -- compute thread ---------------------------------------------------------------
    def _main(self) -> None:
        holding: list[Job] = []
        next_memory_read = 0.0
        compute: DeviceCompute | None = None
        try:
            torch.set_num_threads(self.torch_threads)
            compute = DeviceCompute(torch.device(self.device), self.fault_injection)
            with torch.inference_mode():
                while True:
                    kind, item = self._inbox.get()
                    if kind is _STOP:
                        return
                    if kind == "call":
                        fn, fut = item
                        if fut.set_running_or_notify_cancel():
                            try:
                                fut.set_result(fn(compute))
                            except Exception as exc:  # noqa: BLE001 - handed to the caller
                                fut.set_exception(exc)
                        continue
                    holding = item
                    t0 = time.perf_counter()
                    results = compute.run(holding)
                    wall = time.perf_counter() - t0
                    if compute.is_cuda and t0 >= next_memory_read:
                        # torch.cuda.memory_allocated builds the allocator's whole statistics
                        # dict (hundreds of microseconds): read it at most every
                        # MEMORY_READ_S, not per batch. The peak is the allocator's own
                        # running maximum, so a later read still sees it.
                        next_memory_read = t0 + MEMORY_READ_S
                        self.memory_allocated = torch.cuda.memory_allocated(compute.device)
                        self.memory_peak = torch.cuda.max_memory_allocated(compute.device)
                    done, holding = holding, []
                    self._loop.call_soon_threadsafe(self._on_done, self, done, results, wall)
        except BaseException as exc:  # noqa: BLE001 - the thread is dying; tell the loop
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_death, self, holding, exc)
            self._fail_pending_calls(exc)
        finally:
            if compute is not None:
                compute.close()

    def _fail_pending_calls(self, exc: BaseException) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                _fn, fut = item
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError(f"compute thread died: {exc!r}"))
            elif kind == "batch":
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(self._on_death, self, item, exc)


def resolve_devices(spec: str) -> list[str]:
    """``auto|cpu|cuda|cuda:N|all|a,b`` -> concrete torch device strings."""
    parts = spec.split(",")
    out: list[str] = []
    for p in parts:
        if p == "auto":
            out.append("cuda:0" if torch.cuda.is_available() else "cpu")
        elif p == "all":
            n = torch.cuda.device_count()
            out.extend([f"cuda:{i}" for i in range(n)] or ["cpu"])
        elif p.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {p!r} asked for, but CUDA is not available here")
            idx = int(p.split(":")[1]) if ":" in p else 0
            if idx >= torch.cuda.device_count():
                raise RuntimeError(
                    f"device {p!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
                )
            out.append(f"cuda:{idx}")
        else:
            out.append("cpu")
    return out


def replacement(dead: Executor) -> Executor:
    """A fresh executor with the settings of ``dead`` (the pool's default after a death)."""
    return Executor(dead.device, index=dead.index, torch_threads=dead.torch_threads,
                    fault_injection=dead.fault_injection)


def executors_for(devices: Sequence[str], torch_threads: int, fault_injection: bool) -> list[Executor]:
    return [
        Executor(d, index=i, torch_threads=torch_threads, fault_injection=fault_injection)
        for i, d in enumerate(devices)
    ]
