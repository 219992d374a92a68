"""A request computed by itself on its device, in the compute thread: one that asks for
more than its value (docs/lab.md: a gradient, a numerics report, a profile), or one whose
activation does not pack (a batch-norm layer on CUDA). Its batch still carries it
(queueing, deadlines and metrics are a batch's), but no packing touches it.
"""

from __future__ import annotations

import time

import torch

from service.engine import gradients, numerics, profiling
from service.engine.job import Job, JobResult
from service.engine.tensors import NAMES, apply_alone, tensor_storage, wire_tensor


def _answer(job: Job, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = wire_tensor(job.array, job.wire_dtype).to(device)
    if "grad" not in job.outputs:
        return apply_alone(job, x), None
    upstream = None
    if job.grad_output is not None:
        upstream = wire_tensor(job.grad_output, job.wire_dtype).to(device)
    return gradients.value_and_grad(job, x, upstream)


def _host(t: torch.Tensor):
    return tensor_storage(t.cpu().contiguous())


def compute(job: Job, device: torch.device) -> JobResult:
    t0 = time.perf_counter()
    reports: dict = {}
    if "profile" in job.report:
        (y, grad), reports["profile"] = profiling.profile(device, lambda: _answer(job, device))
    else:
        y, grad = _answer(job, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compute_s = time.perf_counter() - t0
    if "numerics" in job.report:
        try:
            reports["numerics"] = numerics.report(job, y)
        except Exception as exc:  # noqa: BLE001 - the answer stands; the report says why not
            reports["numerics"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result = JobResult(_host(y), NAMES[y.dtype], compute_s, 0, 0, str(device), reports=reports)
    if grad is not None:
        result.grad, result.grad_dtype = _host(grad), NAMES[grad.dtype]
    return result
