"""One request computed alone: the reference every served result equals bit for bit.

``reference`` is what the start-up self-test, the tests, the benchmark's answer checks and
the GPU scripts compare against; ``lone_job`` is the ``Job`` that stands for one request
outside any queue (no deadline), for code that drives ``DeviceCompute`` directly.
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine.activations import Activation
from service.engine.job import Job, Mode
from service.engine.tensors import NAMES, apply_alone, tensor_storage, wire_tensor

PLAIN = Mode(None, False, None, False)  # the input's dtype, no autocast, not in place


def lone_job(activation: Activation, params: tuple, array: np.ndarray | None, wire_dtype: str,
             mode: Mode = PLAIN, **fields) -> Job:
    """A job for one request with no deadline (``fields``: any other ``Job`` field)."""
    return Job(activation=activation, params=params, array=array, wire_dtype=wire_dtype,
               mode=mode, deadline=float("inf"), **fields)


def reference(activation: Activation, params: tuple, array: np.ndarray, wire_dtype: str,
              mode: Mode = PLAIN, device: str | torch.device = "cpu") -> tuple[np.ndarray, str]:
    """``activation`` applied to this request alone, on a tensor of its own shape on
    ``device``, under ``mode`` (exactly the executor's CPU path). ``array`` is wire storage
    (bfloat16 as uint16 bits) and is left untouched, in-place modes included. Returns the
    output in wire storage, on the host, and the output dtype's name. The caller sets the
    intra-op thread count: it is part of "the same mode" on CPU."""
    x = wire_tensor(np.array(array, copy=True), wire_dtype).to(device)
    with torch.inference_mode():
        y = apply_alone(lone_job(activation, params, None, wire_dtype, mode), x)
        return tensor_storage(y.cpu().contiguous()), NAMES[y.dtype]
