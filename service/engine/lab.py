"""A request computed by itself on its device, in the compute thread: one that asks for
more than its value (docs/lab.md: a gradient, a numerics report, a profile), or one whose
activation does not pack (a batch-norm layer on CUDA). Its batch still carries it
(queueing, deadlines and metrics are a batch's), but no packing touches it.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from service.engine import gradients
from service.engine.job import Job, JobResult
from service.engine.reports import REGISTRY
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


_HOOKS: dict[str, Callable] = {}


def _hook(name: str) -> Callable:
    """The engine function that computes a report (its ``compute``), loaded once."""
    where = REGISTRY[name].compute
    fn = _HOOKS.get(where)
    if fn is None:
        module, _, attr = where.partition(":")
        fn = _HOOKS[where] = getattr(importlib.import_module(module), attr)
    return fn


def compute(job: Job, device: torch.device) -> JobResult:
    """The answers a job asks for and its reports (``service/engine/reports``): those of
    stage "around" wrap the computation (in the registry's order, the first outermost),
    those of stage "after" measure the answer once it is computed and timed."""
    t0 = time.perf_counter()
    reports: dict = {}
    asked = [REGISTRY[name] for name in REGISTRY if name in job.report]

    def run():
        return _answer(job, device)

    for r in reversed([r for r in asked if r.stage == "around"]):
        run = _wrapped(r.name, run, job, device, reports)
    y, grad = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compute_s = time.perf_counter() - t0
    for r in asked:
        if r.stage == "after":
            reports[r.name] = _hook(r.name)(job, y)
    result = JobResult(_host(y), NAMES[y.dtype], compute_s, 0, 0, str(device), reports=reports)
    if grad is not None:
        result.grad, result.grad_dtype = _host(grad), NAMES[grad.dtype]
    return result


def _wrapped(name: str, run: Callable, job: Job, device: torch.device, reports: dict):
    def wrapped():
        out, reports[name] = _hook(name)(job, device, run)
        return out
    return wrapped
