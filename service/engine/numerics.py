"""How far an answer is from exact: the numerics report of one request and the accuracy
sweep of an activation (docs/lab.md, "Numerics").

The exact value is the same request computed in float64 (the input's values converted
exactly, the activation applied without autocast). Errors are measured on the answer
actually returned, in its own dtype: absolute, and in ULPs of that dtype at the exact value
(the spacing of representable numbers there; below the smallest normal number, the
subnormal spacing). Non-finite values count as no error when answer and exact value agree
(both NaN, or the same infinity) and are counted apart otherwise.

Runs only in a compute thread.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from service import dtypes
from service.engine.job import Job, Mode
from service.engine.reference import lone_job
from service.engine.tensors import NAMES, apply_alone, wire_tensor

FLOAT64 = Mode("float64", False, None, False)
FLOAT32 = Mode("float32", False, None, False)


def _precision(dtype: torch.dtype) -> tuple[int, int]:
    """(fraction bits, exponent of the smallest normal number)."""
    fi = torch.finfo(dtype)
    return round(-math.log2(fi.eps)), round(math.log2(fi.tiny))


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at each (finite, float64) ``exact`` value."""
    bits, emin = _precision(dtype)
    a = exact.abs().clamp(max=torch.finfo(dtype).max)
    _, e = torch.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    exp = torch.where(a == 0, torch.full_like(e, emin), (e - 1).clamp(min=emin))
    return torch.ldexp(torch.ones_like(a), exp - bits)


def counts(t: torch.Tensor) -> dict[str, int]:
    """NaN, +Inf, -Inf and subnormal values of ``t`` (in its own dtype)."""
    tiny = torch.finfo(t.dtype).tiny
    return {
        "nan": int(torch.isnan(t).sum()),
        "posinf": int(torch.isposinf(t).sum()),
        "neginf": int(torch.isneginf(t).sum()),
        "subnormal": int(((t != 0) & (t.abs() < tiny)).sum()),
    }


def errors(answer: torch.Tensor, exact: torch.Tensor) -> dict[str, float | int]:
    """Largest absolute and ULP error of ``answer`` (its dtype) against float64 ``exact``."""
    y = answer.to(torch.float64)
    both = torch.isfinite(y) & torch.isfinite(exact)
    agree = (torch.isnan(y) & torch.isnan(exact)) | (~torch.isnan(y) & (y == exact))
    mismatch = int((~both & ~agree).sum())
    diff = (y - exact).abs()[both]
    if diff.numel() == 0:
        return {"max_abs_error": 0.0, "max_ulp_error": 0.0, "nonfinite_mismatch": mismatch}
    ulps = diff / ulp(exact[both], answer.dtype)
    return {"max_abs_error": float(diff.max()), "max_ulp_error": float(ulps.max()),
            "nonfinite_mismatch": mismatch}


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def measured(job: Job, answer: torch.Tensor) -> dict:
    """The numerics report of a request (``service/engine/reports/numerics.py``): the
    answer stands when it cannot be measured, and the report says why not."""
    try:
        return report(job, answer)
    except Exception as exc:  # noqa: BLE001 - the answer stands; the report says why not
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def report(job: Job, answer: torch.Tensor) -> dict:
    """The numerics report of ``job``'s ``answer`` (the value returned, on any device)."""
    device = answer.device
    x = wire_tensor(job.array, job.wire_dtype)
    exact = apply_alone(lone_job(job.activation, job.params, job.array, job.wire_dtype, FLOAT64),
                        x.to(device)).cpu()
    f32 = apply_alone(lone_job(job.activation, job.params, job.array, job.wire_dtype, FLOAT32),
                      x.to(device)).to(answer.dtype)
    out = {
        "dtype": NAMES[answer.dtype],
        "compute_dtype": job.compute_dtype,
        "amp": job.mode.amp,
        "elements": int(answer.numel()),
        **errors(answer.cpu(), exact),
        "differs_from_float32": int((~_same(answer, f32)).sum()),
        "input": counts(x),
        "output": counts(answer.cpu()),
    }
    return out


# -- the accuracy sweep -------------------------------------------------------------------------
SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, 1e-40, 6e-8, -6e-8,
           1e-5, 65504.0, -65504.0, 1e30, -1e30, 3.4e38, -3.4e38]
AMP_SETTINGS = (("off", Mode(None, False, None, False)),
                ("float16", Mode(None, True, "float16", False)),
                ("bfloat16", Mode(None, True, "bfloat16", False)))
WIRE = ("float16", "bfloat16", "float32", "float64")
GRID_DOC = ("special values (0, -0, NaN, +-Inf, subnormals, float16's largest, 1e30, "
            "float32's largest), +-1e-8 .. 1e4 (1,000 log-spaced points a side) and -10 .. 10 "
            "(1,000 points), rounded to each dtype; the activation's default params")


def platform(device: torch.device) -> dict:
    """What produced a sweep's figures: torch picks its CPU kernels by vector extension, so
    an accuracy table is a property of the kernels that ran, not of the activation alone.
    ``key`` names the table in docs/lab.md (``loadtest.accuracy_table``)."""
    import torch.cpu as tcpu

    features = sorted(name[4:-10] for name in dir(tcpu)
                      if name.startswith("_is_") and name.endswith("_supported")
                      and name not in ("_is_avx2_supported", "_is_avx512_supported")
                      and _feature(getattr(tcpu, name)))
    out = {"device": str(device), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": features}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["key"] = f"cuda {out['gpu']}, torch {out['torch']}"
    else:
        out["key"] = " ".join([f"cpu {out['cpu_capability']}", *(f"+{f}" for f in features)]) \
            + f", torch {out['torch']}"
    return out


def _feature(probe) -> bool:
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - a probe torch cannot answer counts as absent
        return False


def grid() -> np.ndarray:
    """The fixed sweep: special values, then +-10**-8 .. 10**4 (1,000 points a side) and a
    uniform +-10 (1,000 points)."""
    logs = np.logspace(-8, 4, 1000)
    return np.concatenate([SPECIAL, logs, -logs, np.linspace(-10, 10, 1000)])


def sweep(activation, device: torch.device, refuse) -> list[dict]:
    """One row per (wire dtype, amp setting): the report of ``grid()`` in that dtype, with
    the activation's default params. ``refuse(wire, mode)``: why the combination is not
    served here, or None."""
    values = grid()
    shape = activation.example_shape(len(values))
    values = np.resize(values, int(np.prod(shape))).reshape(shape)
    params = activation.parse_params({})
    rows = []
    for wire in WIRE:
        array = dtypes.from_float(values, wire)
        for amp, mode in AMP_SETTINGS:
            row = {"dtype": wire, "amp": amp}
            problem = refuse(wire, mode)
            if problem:
                rows.append({**row, "unsupported": problem})
                continue
            job = lone_job(activation, params, array, wire, mode)
            y = apply_alone(job, wire_tensor(array, wire).to(device))
            r = report(job, y)
            rows.append({**row, "out_dtype": r["dtype"], "max_abs_error": r["max_abs_error"],
                         "max_ulp_error": r["max_ulp_error"],
                         "nonfinite_mismatch": r["nonfinite_mismatch"],
                         "differs_from_float32": r["differs_from_float32"],
                         "elements": r["elements"]})
    return rows

