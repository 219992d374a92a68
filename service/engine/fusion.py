"""Fusion: a registered custom activation's expression compiled with ``torch.compile``, off
the request path, served only where it keeps the exactness promise
(docs/custom-activations.md, "Fusion").

Exact by default: a custom activation is eager unless its registration asks for fusion
(``"fusion": true``, or ``{"max_ulp": N}`` to accept a stated bound) or the server's
``--fusion auto`` asks for every registration. ``Fuser.attach`` hands the activation a
``Fused`` entry from a bounded LRU keyed by (device, normalized expression, param defaults,
batch-norm or not, accepted bound); a new entry is compiled by one daemon thread of its own,
never on the loop and never in a compute thread, and the registration is served only once
that decision is made, so the form that answers never changes while the activation lives.
The rules:

* The check runs the self-test grid (``selftest.sample``) in each dtype tried and records
  the largest difference from eager in ULPs of that dtype (``max_ulp_vs_eager``). A dtype
  is served compiled only when that difference is within the accepted bound: 0 (bit for bit)
  unless the registrant stated another. No dtype within it: eager, reason recorded.
* CUDA: compiled once it compiles and passes the check.
* CPU: inductor builds C++ kernels, so without its compiler (``$CXX``, else ``g++``) the
  entry stays eager with that reason. Eager and compiled are timed on 1,048,576 float32
  elements (median of 5); where the compiled form is bit for bit the eager one, the faster
  serves (the answer is the same either way); where the registrant accepted a bound, the
  compiled form serves once it passes, whatever the timings, so no answer depends on a
  timing race. The timings are reported either way.
* Any failure (an exception, a compile slower than ``COMPILE_LIMIT_S``, NaNs where eager has
  none) leaves it eager, reason recorded, counted in ``outcomes`` (``/metrics``) and logged
  as a warning once per entry.

Every entry compiles its own code object (``_bound``), so dynamo's per-code cache and its
recompile limit see one function an entry, never a shared one that every registration
recompiles.

The compiled form takes one flattened tensor (``dynamic=True``), so one compile serves every
request size; dynamic shapes specialise sizes 0 and 1, which would recompile on the request
path, so those are padded to 2 elements (the kernel is elementwise). In-place and autocast
requests, gradient requests (autograd differentiates the eager form), params other than the
defaults, dtypes not tried or not within the bound and other devices run eager. Batch-norm
layers normalise eagerly and compile the expression after it. Compiled CUDA kernels are
elementwise, so a packed batch equals each request alone there too.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import statistics
import sys
import threading
import time
import types
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.engine import selftest
from service.engine.compute import wire_tensor

MAX_ENTRIES = 64
CPU_DTYPES = (torch.float32,)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRID_SIZES = (0, 1, 7, 64, 1000, 4099)  # the self-test's sizes
BACKEND = "inductor"  # torch.compile's backend (tests may use a cheaper one)
MIN_ELEMENTS = 2  # smaller inputs are padded: dynamic shapes specialise sizes 0 and 1
TIME_ELEMENTS = 1 << 20
TIME_RUNS = 5
COMPILE_LIMIT_S = 300.0
MAX_ULP = 1024  # the largest bound a registration may accept
OFF = "fusion is off (ACTSERVE_FUSION=off)"
NOT_ASKED = ("exact by default: this registration did not ask for fusion (\"fusion\": true, "
             "or {\"max_ulp\": N} to accept a bound; --fusion auto asks for every one)")
NAN_MISMATCH = "NaN where the other form has none"
OUTCOMES = ("compiled", "differs", "slower", "no_compiler", "failed")
log = logging.getLogger("actserve.fusion")
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
    bound: int = 0  # the ULPs from eager the registrant accepts; 0: bit for bit
    label: str = ""  # the expression, for the log
    state: str = "pending"  # pending | compiled | eager
    reason: str = ""
    outcome: str = ""  # one of OUTCOMES once decided
    timings_ms: dict = field(default_factory=dict)
    max_ulp_vs_eager: dict = field(default_factory=dict)
    compile_s: float | None = None
    compiled: dict = field(default_factory=dict)  # torch dtype -> compiled callable
    decided: Future = field(default_factory=Future)  # the state, set by the fusion thread

    def describe(self) -> dict:
        out = {"state": self.state, "device": str(self.device), "accepted_ulp": self.bound}
        if self.state == "compiled":
            out["dtypes"] = [_WIRE[d] for d in self.compiled]
        if self.state == "eager":
            out["reason"] = self.reason
        if self.compile_s is not None:
            out["compile_s"] = round(self.compile_s, 2)
        if self.timings_ms:
            out["cpu_timings_ms"] = dict(self.timings_ms)
        # JSON has no infinity: a NaN where the other form has none reads as that
        out["max_ulp_vs_eager"] = {k: (v if math.isfinite(v) else NAN_MISMATCH)
                                   for k, v in self.max_ulp_vs_eager.items()}
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
        """Compile and check; the decision is published by ``publish``."""
        try:
            self._decide()
        except Exception as exc:  # noqa: BLE001 - recorded as the reason
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            self._eager(f"compiling failed: {type(exc).__name__}: {' '.join(lines[:2])[:240]}",
                        "failed")

    def publish(self) -> None:
        """The decision is final: whoever waits for it may serve from now on."""
        self.decided.set_result(self.state)

    def _eager(self, reason: str, outcome: str) -> None:
        self.compiled = {}
        self.reason = reason
        self.state = "eager"
        self.outcome = outcome

    def _decide(self) -> None:
        cuda = self.device.type == "cuda"
        if not cuda:
            name, path = cpp_compiler()
            if path is None:
                return self._eager(f"no C++ compiler: {name!r} is not on PATH (torch inductor "
                                   "builds CPU kernels with it; set CXX to another)", "no_compiler")
        t0 = time.perf_counter()
        compiled = {}
        with torch.inference_mode():
            for dtype in CUDA_DTYPES if cuda else CPU_DTYPES:
                compiled[dtype] = torch.compile(self.fn, dynamic=True, fullgraph=True,
                                                backend=BACKEND)
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
                               f"{COMPILE_LIMIT_S:.0f} s bound", "failed")
        within = {d: f for d, f in compiled.items() if self.max_ulp_vs_eager[_WIRE[d]] <= self.bound}
        if not within:
            return self._eager(f"compiled answers differ from eager by up to "
                               f"{self.max_ulp_vs_eager} ULPs; this registration accepts "
                               f"{self.bound} (\"fusion\": {{\"max_ulp\": N}} accepts more)",
                               "differs")
        if not cuda and torch.float32 in within:
            eager_ms, fast_ms = self._time(within[torch.float32])
            self.timings_ms = {"elements": TIME_ELEMENTS, "eager": round(eager_ms, 4),
                               "compiled": round(fast_ms, 4)}
            if self.bound == 0 and fast_ms >= eager_ms:  # the same bits either way
                return self._eager(f"eager is as fast or faster on this CPU ({eager_ms:.3f} ms "
                                   f"vs compiled {fast_ms:.3f} ms, {TIME_ELEMENTS:,} float32); "
                                   "the answers are the same bits either way", "slower")
        self.compiled = within
        self.state = "compiled"
        self.outcome = "compiled"

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

    def __init__(self, note: str | None = "inline expressions run eagerly",
                 asked: int | None = None) -> None:
        self.entry: Fused | None = None
        self.note = note
        self.asked = asked  # the ULP bound the registration accepts; None: not asked

    def describe(self) -> dict | None:
        if self.entry is None and self.note is None:
            return None
        if self.entry is None:
            out = {"state": "eager", "reason": self.note, "max_ulp_vs_eager": {}}
            if self.asked is not None:
                out["accepted_ulp"] = self.asked
            return out
        return self.entry.describe()


class Fuser:
    """The bounded cache of ``Fused`` entries of one engine, and the thread compiling them.
    ``mode``: ``request`` (the default: compile the registrations that ask), ``auto``
    (every registration, bit for bit unless it accepts a bound) or ``off``."""

    def __init__(self, mode: str, device: str, max_entries: int = MAX_ENTRIES) -> None:
        self.mode = mode
        self.device = torch.device(device)
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Fused] = OrderedDict()
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue[Fused] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._outcomes: Counter[str] = Counter()
        self._made = 0

    def __len__(self) -> int:
        return len(self._entries)

    def outcomes(self) -> dict[str, int]:
        """Decisions made so far, by outcome (``OUTCOMES``), for ``/metrics``."""
        with self._lock:
            return {k: self._outcomes[k] for k in OUTCOMES}

    def attach(self, activation) -> Future | None:
        """Give a registered custom activation its entry (compiled in the background); the
        future of its decision, or None when it stays eager without one."""
        slot = activation.fusion
        if self.mode == "off":
            slot.entry, slot.note = None, OFF
            return None
        bound = slot.asked if slot.asked is not None else 0 if self.mode == "auto" else None
        if bound is None:
            slot.entry, slot.note = None, NOT_ASKED
            return None
        expr = activation.expression
        defaults = {p.name: p.default for p in activation.params if p.name in expr.params}
        key = (str(self.device), expr.normalized, tuple(sorted(defaults.items())),
               activation.batch_norm is not None, bound)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            else:
                self._made += 1
                entry = self._entries[key] = Fused(
                    self.device, _bound(expr, defaults, self._made), defaults, bound,
                    label=expr.normalized)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)  # its holders keep using it
                self._todo.put(entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="actserve-fusion")
                    self._thread.start()
        slot.entry = entry
        return entry.decided

    def _run(self) -> None:
        while True:
            entry = self._todo.get()
            try:
                entry.prepare()
                with self._lock:  # counted and logged before anyone hears of the decision
                    self._outcomes[entry.outcome] += 1
                if entry.outcome not in ("compiled", "slower"):
                    log.warning("fusion: %s stays eager on %s: %s", entry.label, entry.device,
                                entry.reason)
            finally:
                entry.publish()


def _bound(expr, defaults: dict, serial: int):
    """The expression at its defaults as a function with a code object of its own: dynamo
    keeps its compiled code and guards per code object, with a recompile limit, so closures
    sharing one code object would make every new registration a recompile of the last."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return expr(x, **defaults)

    name = f"fused_{serial}"
    code = fn.__code__.replace(co_name=name, co_qualname=name) \
        if hasattr(fn.__code__, "co_qualname") else fn.__code__.replace(co_name=name)
    own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    own.__qualname__ = name
    return own
