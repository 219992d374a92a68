"""Tensors on the wire and the one reference computation, shared by the executor
(``compute.py``) and the lab's modules (``lab.py``, ``gradients.py``, ``numerics.py``,
``reference.py``, ``device_io.py``), which import it rather than the executor: the lab
never imports ``compute``, so the engine's modules form no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from service.engine.job import Job

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def wire_tensor(array: np.ndarray, wire_dtype: str) -> torch.Tensor:
    """Zero-copy torch view of a wire array (bfloat16 travels as uint16 bits)."""
    if wire_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def tensor_storage(t: torch.Tensor) -> np.ndarray:
    """Numpy wire storage of a CPU tensor (bfloat16 -> uint16 bits), zero-copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def autocast_dtype(device_type: str, amp_dtype: str | None) -> torch.dtype:
    if amp_dtype is not None:
        return TORCH_DTYPES[amp_dtype]
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def apply_alone(job_like: Job, x: torch.Tensor) -> torch.Tensor:
    """The reference: the activation applied to one request's tensor ``x`` (wire dtype,
    on the target device) under that request's mode. The executor's CPU path is exactly
    this; tests and the warm-up self-test compare against it."""
    mode = job_like.mode
    target = TORCH_DTYPES[mode.compute_dtype] if mode.compute_dtype else x.dtype
    if x.dtype != target:
        x = x.to(target)
    if not mode.amp:  # the same as autocast(enabled=False), without the context's cost
        return job_like.activation.apply(x, mode.inplace, job_like.params)
    with torch.autocast(x.device.type, dtype=autocast_dtype(x.device.type, mode.amp_dtype)):
        return job_like.activation.apply(x, mode.inplace, job_like.params)
