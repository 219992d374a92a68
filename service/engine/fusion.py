"""Fusion: a registered custom activation's expression compiled with ``torch.compile``, off
the request path, and served compiled where it pays (docs/custom-activations.md, "Fusion").

``Fuser.attach`` (on the event loop, at registration) hands the activation a ``Fused`` entry
from a bounded LRU keyed by (device, normalized expression, param defaults, batch-norm or
not); a new entry is compiled by one daemon thread of its own, never on the loop and never
in a compute thread. Until that thread has compiled and checked it, the entry serves eager.
The rules:

* CUDA: compiled once it compiles and passes the check.
* CPU: inductor builds C++ kernels, so without its compiler (``$CXX``, else ``g++``) the
  entry stays eager with that reason. With one, eager and compiled are timed on 1,048,576
  float32 elements (median of 5, the compute thread's intra-op threads) and the faster one
  serves.
* Any failure (an exception, a compile slower than ``COMPILE_LIMIT_S``, answers more than
  ``MAX_ULP`` ULPs from eager, NaNs where eager has none) leaves it eager, reason recorded.

The check runs the self-test grid (``selftest.sample``) in each dtype tried and records the
largest difference from eager in ULPs of that dtype (``max_ulp_vs_eager``).

The compiled form takes one flattened tensor (``dynamic=True``), so one compile serves every
request size; dynamic shapes specialise sizes 0 and 1, which would recompile on the request
path, so those are padded to 2 elements (the kernel is elementwise). In-place and autocast
requests, gradient requests (autograd differentiates the eager form), params other than the
defaults, dtypes not tried and other devices run eager. Batch-norm layers
normalise eagerly and compile the expression after it. Compiled CUDA kernels are
elementwise, so a packed batch equals each request alone there too.
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from service.engine import selftest
from service.engine.compute import wire_tensor

MAX_ENTRIES = 64
CPU_DTYPES = (torch.float32,)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRID_SIZES = (0, 1, 7, 64, 1000, 4099)  # the self-test's sizes
MIN_ELEMENTS = 2  # smaller inputs are padded: dynamic shapes specialise sizes 0 and 1
TIME_ELEMENTS = 1 << 20
TIME_RUNS = 5
COMPILE_LIMIT_S = 300.0
MAX_ULP = 1024
OFF = "fusion is off (ACTSERVE_FUSION=off)"
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
         torch.float64: "float64"}


def cpp_compiler() -> tuple[str, str | None]:
    """The C++ compiler inductor builds CPU kernels with (``$CXX``, else g++ or, on macOS,
    clang++) and its path, or None when it is not on PATH."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return name, shutil.which(name)


def max_ulp(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference between two tensors of one float dtype in ULPs of that dtype
    (NaN equals NaN, -0.0 equals 0.0); inf when one has a NaN where the other has none."""
    if got.numel() == 0:
        return 0.0
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    if not torch.equal(nan_g, nan_w):
        return float("inf")
    bits = _BITS[got.dtype]
    magnitude = torch.iinfo(bits).max

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    diff = (ordered(got) - ordered(want)).abs()
    diff = torch.where(nan_g, torch.zeros_like(diff), diff)
    return float(diff.max().item())


@dataclass(eq=False)
class Fused:
    """One expression's compiled forms on one device, and what was decided about them."""

    device: torch.device
    fn: object  # x -> tensor: the expression with its params at their defaults
    defaults: dict
    state: str = "pending"  # pending | compiled | eager
    reason: str = ""
    timings_ms: dict = field(default_factory=dict)
    max_ulp_vs_eager: dict = field(default_factory=dict)
    compile_s: float | None = None
    compiled: dict = field(default_factory=dict)  # torch dtype -> compiled callable
    ready: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict:
        out = {"state": self.state, "device": str(self.device)}
        if self.state == "eager":
            out["reason"] = self.reason
        if self.compile_s is not None:
            out["compile_s"] = round(self.compile_s, 2)
        if self.timings_ms:
            out["cpu_timings_ms"] = dict(self.timings_ms)
        out["max_ulp_vs_eager"] = dict(self.max_ulp_vs_eager)
        return out

    def takes(self, x: torch.Tensor, values: dict) -> bool:
        """Whether the compiled form serves this tensor (see the module's rules)."""
        return (self.state == "compiled" and x.dtype in self.compiled
                and x.device == self.device and values == self.defaults
                and not x.requires_grad  # gradients are autograd's, of the eager form
                and not torch.is_autocast_enabled(x.device.type))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled form on ``x`` flattened; 0 and 1 elements are padded to 2 (the
        kernel is elementwise), since dynamic shapes specialise those sizes."""
        flat = x.reshape(-1)
        n = flat.numel()
        if n < MIN_ELEMENTS:
            flat = torch.cat([flat, flat.new_zeros(MIN_ELEMENTS - n)])
        return self.compiled[x.dtype](flat)[:n].reshape(x.shape)

    # -- the fusion thread ---------------------------------------------------------------
    def prepare(self) -> None:
        try:
            self._decide()
        except Exception as exc:  # noqa: BLE001 - recorded as the reason
            self._eager(f"compiling failed: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
        finally:
            self.ready.set()

    def _eager(self, reason: str) -> None:
        self.compiled = {}
        self.reason = reason
        self.state = "eager"

    def _decide(self) -> None:
        cuda = self.device.type == "cuda"
        if not cuda:
            name, path = cpp_compiler()
            if path is None:
                return self._eager(f"no C++ compiler: {name!r} is not on PATH (torch inductor "
                                   "builds CPU kernels with it; set CXX to another)")
        t0 = time.perf_counter()
        compiled = {}
        with torch.inference_mode():
            for dtype in CUDA_DTYPES if cuda else CPU_DTYPES:
                compiled[dtype] = torch.compile(self.fn, dynamic=True, fullgraph=True)
                self.compiled = compiled  # not served before state is "compiled"
                worst = 0.0
                for i, n in enumerate(GRID_SIZES):
                    x = _tensor(selftest.sample(n, _WIRE[dtype], i), dtype).to(self.device)
                    worst = max(worst, max_ulp(self(x), self.fn(x)))
                self.max_ulp_vs_eager[_WIRE[dtype]] = worst
            if cuda:
                torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - t0
        if self.compile_s > COMPILE_LIMIT_S:
            return self._eager(f"compiling took {self.compile_s:.0f} s, over the "
                               f"{COMPILE_LIMIT_S:.0f} s bound")
        far = {k: v for k, v in self.max_ulp_vs_eager.items() if v > MAX_ULP}
        if far:
            return self._eager(f"compiled answers differ from eager by up to {far} ULPs "
                               f"(bound {MAX_ULP})")
        if not cuda:
            eager_ms, fast_ms = self._time(compiled[torch.float32])
            self.timings_ms = {"elements": TIME_ELEMENTS, "eager": round(eager_ms, 4),
                               "compiled": round(fast_ms, 4)}
            if fast_ms >= eager_ms:
                return self._eager(f"eager is as fast or faster on this CPU ({eager_ms:.3f} ms "
                                   f"vs compiled {fast_ms:.3f} ms, {TIME_ELEMENTS:,} float32)")
        self.compiled = compiled
        self.state = "compiled"

    def _time(self, fast) -> tuple[float, float]:
        x = torch.randn(TIME_ELEMENTS, generator=torch.Generator().manual_seed(0)) * 4
        runs: dict[str, list[float]] = {"eager": [], "compiled": []}
        with torch.inference_mode():
            for _ in range(TIME_RUNS + 1):  # interleaved; the first round warms up
                for side, f in (("eager", self.fn), ("compiled", fast)):
                    t = time.perf_counter()
                    f(x)
                    runs[side].append((time.perf_counter() - t) * 1e3)
        return statistics.median(runs["eager"][1:]), statistics.median(runs["compiled"][1:])


def _tensor(array, dtype: torch.dtype) -> torch.Tensor:
    return wire_tensor(array, _WIRE[dtype]).clone()


class Slot:
    """A custom activation's hold on its ``Fused`` entry (None: eager, for ``note``). A
    server process in front of the engine process (``--engine process``) never compiles:
    its copies have no entry and no note, and describe nothing (``describe`` is None)."""

    def __init__(self, note: str | None = "inline expressions run eagerly") -> None:
        self.entry: Fused | None = None
        self.note = note

    def describe(self) -> dict | None:
        if self.entry is None and self.note is None:
            return None
        if self.entry is None:
            return {"state": "eager", "reason": self.note, "max_ulp_vs_eager": {}}
        return self.entry.describe()


class Fuser:
    """The bounded cache of ``Fused`` entries of one engine, and the thread compiling them."""

    def __init__(self, mode: str, device: str, max_entries: int = MAX_ENTRIES) -> None:
        self.mode = mode
        self.device = torch.device(device)
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Fused] = OrderedDict()
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue[Fused] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def attach(self, activation) -> None:
        """Give a registered custom activation its entry (compiled in the background)."""
        slot = activation.fusion
        if self.mode == "off":
            slot.entry, slot.note = None, OFF
            return
        expr = activation.expression
        defaults = {p.name: p.default for p in activation.params if p.name in expr.params}
        key = (str(self.device), expr.normalized, tuple(sorted(defaults.items())),
               activation.batch_norm is not None)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            else:
                entry = self._entries[key] = Fused(self.device, _bound(expr, defaults), defaults)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)  # its holders keep using it
                self._todo.put(entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="actserve-fusion")
                    self._thread.start()
        slot.entry = entry

    def _run(self) -> None:
        while True:
            self._todo.get().prepare()


def _bound(expr, defaults: dict):
    def fn(x: torch.Tensor) -> torch.Tensor:
        return expr(x, **defaults)

    return fn
