"""Derivatives of an activation for one request: the value and ``torch.autograd.grad`` of it
with respect to the input as sent (docs/lab.md, "Gradients").

Runs only in a compute thread, which otherwise computes under ``torch.inference_mode``:
autograd is switched back on for the request alone. The input is the leaf, in its wire
dtype, so a ``compute_dtype`` conversion and autocast are part of the differentiated
function, exactly as in ``apply_alone``; the gradient comes back in the input's dtype.
"""

from __future__ import annotations

import torch

from service.engine.job import Job
from service.engine.tensors import apply_alone


def value_and_grad(job: Job, x: torch.Tensor,
                   upstream: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``: the request's input (wire dtype, on its device); ``upstream``: the gradient
    of a vector-Jacobian product (the input's dtype and shape), or None for the
    elementwise derivative (an upstream gradient of ones). Both come back detached."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)  # an ordinary tensor autograd may save
        y = apply_alone(job, leaf)
        if not y.requires_grad:  # an expression that does not depend on x
            return y.detach(), torch.zeros_like(leaf).detach()
        g = torch.ones_like(y) if upstream is None else upstream.clone().to(y.dtype)
        (grad,) = torch.autograd.grad(y, leaf, grad_outputs=g)
        return y.detach(), grad.detach()
