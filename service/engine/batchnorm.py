"""Batch-norm + activation layers: a custom activation may normalise its input with stored
per-channel statistics before the expression (``nn.BatchNorm1d/2d`` in ``eval()``), or, with
``batch_stats=true`` on a request, with that request's own statistics (``train()``'s
normalisation, computed on the request alone; nothing is stored).

The channel dimension is dim 1 (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...). Requests
are computed one by one on CPU, so a request's statistics never mix with another's; on CUDA
the packed path would flatten them together, so these layers are CPU only (refused at
registration on a CUDA server).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from service.engine.params import refuse_unknown
from service.errors import InvalidRequest, echo
from service.validation import number

MAX_CHANNELS = 4096


@dataclass(frozen=True)
class BatchNorm:
    mean: tuple[float, ...]
    var: tuple[float, ...]
    weight: tuple[float, ...]
    bias: tuple[float, ...]
    eps: float = 1e-5
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def describe(self) -> dict:
        return {"channels": self.channels, "eps": self.eps, "running_mean": list(self.mean),
                "running_var": list(self.var), "weight": list(self.weight),
                "bias": list(self.bias)}

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2 or shape[1] != self.channels:
            return (f"this activation normalises {self.channels} channels on dim 1: the "
                    f"input must be (N, {self.channels}, ...), got shape {list(shape)}")
        return None

    def _stored(self, like: torch.Tensor) -> list[torch.Tensor]:
        key = (like.dtype, like.device)
        found = self._tensors.get(key)
        if found is None:  # float32 statistics, as an nn.BatchNorm module holds them
            found = [torch.tensor(v, dtype=torch.float32).to(like.device)
                     for v in (self.mean, self.var, self.weight, self.bias)]
            if like.dtype == torch.float64:  # the exact (float64) value: the same float32
                found = [t.to(torch.float64) for t in found]  # statistics, converted exactly
            self._tensors[key] = found
        return found

    def batch_stats_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a request of ``shape`` cannot be normalised with its own statistics (as
        ``train()`` would refuse it), or None."""
        per_channel = math.prod(shape) // max(self.channels, 1)
        if per_channel <= 1:
            return (f"batch_stats needs more than one value per channel (N x spatial size > 1, "
                    f"as nn.BatchNorm in train() requires); shape {list(shape)} has "
                    f"{per_channel}")
        return None

    def apply(self, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        mean, var, weight, bias = self._stored(x)
        if batch_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


def parse(raw: object, where: str) -> BatchNorm:
    """``{"channels"?: C, "running_mean": [...], "running_var": [...], "weight"?: [...],
    "bias"?: [...], "eps"?: 1e-5}`` (weight defaults to ones, bias to zeros, as a fresh
    module's; ``channels``, when given, must equal the length of every statistic)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object with running_mean and running_var")
    refuse_unknown(raw, ("channels", "running_mean", "running_var", "weight", "bias", "eps"), where)
    mean = _vector(raw.get("running_mean"), f"{where}.running_mean", None)
    n = len(mean)
    if "channels" in raw:  # optional: checked against every statistic's length
        channels = raw["channels"]
        if isinstance(channels, bool) or not isinstance(channels, int) \
                or not 1 <= channels <= MAX_CHANNELS:
            raise InvalidRequest(f"{where}.channels must be an integer in [1, {MAX_CHANNELS}], "
                                 f"got {echo(channels)}")
        for key in ("running_mean", "running_var", "weight", "bias"):
            if key in raw and isinstance(raw[key], list) and len(raw[key]) != channels:
                raise InvalidRequest(f"{where}.{key} has {len(raw[key])} values; "
                                     f"channels is {channels}")
    var = _vector(raw.get("running_var"), f"{where}.running_var", n)
    if any(v < 0 for v in var):
        raise InvalidRequest(f"{where}.running_var: variances must be >= 0")
    weight = _vector(raw.get("weight", [1.0] * n), f"{where}.weight", n)
    bias = _vector(raw.get("bias", [0.0] * n), f"{where}.bias", n)
    eps = raw.get("eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not 0 < number(eps, f"{where}.eps") <= 1:
        raise InvalidRequest(f"{where}.eps must be a number in (0, 1], got {echo(eps)}")
    return BatchNorm(mean, var, weight, bias, float(eps))


def _vector(raw: object, where: str, n: int | None) -> tuple[float, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CHANNELS:
        raise InvalidRequest(f"{where} must be a list of 1 to {MAX_CHANNELS} numbers")
    if n is not None and len(raw) != n:
        raise InvalidRequest(f"{where} has {len(raw)} values; running_mean has {n}")
    try:  # number(): a 400-digit integer is a 400 here, never an OverflowError (a 500)
        return tuple(number(v, where) for v in raw)
    except InvalidRequest:
        raise InvalidRequest(f"{where} must hold finite numbers only") from None
