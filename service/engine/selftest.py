"""Start-up checks run inside a compute thread before the server reports ready.

* ``probe``: which (activation, compute dtype, amp, in-place) combinations run at all on
  this device; the rest become 400s with the reason (``Capabilities``).
* ``self_test``: every activation, batched with other requests of different sizes, equals
  the same activation applied to each request alone, bit for bit, on special values (NaN,
  +-Inf, -0.0, subnormals) and random ones.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from service import dtypes
from service.engine.activations import Registry
from service.engine.capabilities import Capabilities
from service.engine.compute import DeviceCompute
from service.engine.job import JobResult, Mode
from service.engine.reference import lone_job, reference

SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-40, 1.0, -1.0,
            3.0, -3.0, 20.0, -20.0, 100.0, -100.0]
AMP_DTYPES = (None, "float16", "bfloat16")


def sample(n: int, wire: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * 4
    values[: min(n, len(SPECIALS))] = SPECIALS[: min(n, len(SPECIALS))]
    return dtypes.from_float(values, wire)


def example(act, n: int, wire: str, seed: int) -> np.ndarray:
    """``sample`` in the activation's example shape (``n`` rows)."""
    shape = act.example_shape(n)
    return sample(int(np.prod(shape)), wire, seed).reshape(shape)


def probe(compute: DeviceCompute, registry: Registry) -> dict[tuple, str]:
    failures: dict[tuple, str] = {}
    for act in registry:
        params = act.parse_params({})
        for compute_dtype, amp_dtype, inplace in itertools.product(
            dtypes.NAMES, AMP_DTYPES, (False, True)
        ):
            mode = Mode(compute_dtype, amp_dtype is not None, amp_dtype, inplace)
            if inplace and not act.supports_inplace:
                failures[Capabilities.key(act.name, compute_dtype, mode)] = (
                    f"{act.name} has no in-place form")
                continue
            try:
                reference(act, params, example(act, 8, compute_dtype, 0), compute_dtype, mode,
                          compute.device)
            except Exception as exc:  # noqa: BLE001 - recorded as the reason
                key = Capabilities.key(act.name, compute_dtype, mode)
                failures[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return failures


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def self_test(compute: DeviceCompute, registry: Registry, capabilities: Capabilities) -> list[str]:
    """Returns a list of problems; empty means every activation passed."""
    problems = []
    sizes = (0, 1, 7, 64, 1000, 4099)
    for act in registry:
        params = act.parse_params({})
        for wire in ("float32", "float16"):
            mode = Mode(None, False, None, False)
            try:
                capabilities.check(act, wire, mode)
            except Exception:  # noqa: BLE001 - unsupported here: nothing to test
                continue
            jobs = [lone_job(act, params, example(act, n, wire, i), wire, mode)
                    for i, n in enumerate(sizes)]
            expected = [reference(act, params, j.array, wire, mode, compute.device)[0]
                        for j in jobs]
            got = compute.run(jobs)
            for n, r, e in zip(sizes, got, expected, strict=True):
                if not isinstance(r, JobResult) or not _same_bits(np.asarray(r.array), e):
                    problems.append(f"{act.name}/{wire}: batched result differs for size {n}")
    if compute.is_cuda:
        torch.cuda.synchronize(compute.device)
    return problems
