"""The activation registry: each entry's formula, parameter schema, in-place support and
torch implementation.

``Activation.apply(x, inplace, params)`` is the only place torch activation calls happen;
the executor and the reference used by the warm-up self-test and the tests both go through
it, so "the reference applied to that request alone" is exactly ``apply`` on that tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from service.engine.params import ChoiceParam, FloatParam, Param
from service.errors import InvalidRequest, UnknownActivation, echo

Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Activation:
    name: str
    formula: str
    fn: Fn
    inplace_fn: Fn | None = None
    params: tuple[Param, ...] = ()
    torch_ref: str = ""
    cross_check: Callable[[Mapping[str, Any]], str | None] | None = field(
        default=None, compare=False
    )

    @property
    def packs(self) -> bool:
        """Whether requests may be concatenated into one tensor and computed at once (the
        CUDA path): true for elementwise functions; layers that look across elements
        (batch norm) are computed request by request."""
        return True

    @property
    def supports_inplace(self) -> bool:
        return self.inplace_fn is not None

    def parse_params(self, raw: Mapping[str, object], where: str = "params") -> tuple:
        """Validate raw params; return a hashable, ordered ``((name, value), ...)`` tuple."""
        known = {p.name: p for p in self.params}
        for key in raw:
            if key not in known:
                allowed = ", ".join(known) if known else "none"
                raise InvalidRequest(
                    f"{where}: unknown parameter {echo(key)} for {self.name}; allowed: {allowed}"
                )
        values = {p.name: (p.parse(raw[p.name], where) if p.name in raw else p.default)
                  for p in self.params}
        if self.cross_check is not None:
            problem = self.cross_check(values)
            if problem:
                raise InvalidRequest(f"{where}: {problem}")
        return tuple(values.items())

    def apply(self, x: torch.Tensor, inplace: bool, params: tuple) -> torch.Tensor:
        kwargs = dict(params)
        if inplace:
            if self.inplace_fn is None:
                raise InvalidRequest(f"{self.name} has no in-place form")
            return self.inplace_fn(x, **kwargs)
        return self.fn(x, **kwargs)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why an input of ``shape`` cannot be computed (None: it can; elementwise ones
        take any shape)."""
        return None

    def example_shape(self, n: int) -> tuple[int, ...]:
        """The shape of an ``n``-row input for the probe and self-test."""
        return (n,)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "formula": self.formula,
            "torch": self.torch_ref,
            "params": [p.describe() for p in self.params],
            "inplace": self.supports_inplace,
        }


def _relu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) * torch.sigmoid(x)


def _relu_sigmoid_(x: torch.Tensor) -> torch.Tensor:
    gate = torch.sigmoid(x)
    return torch.relu_(x).mul_(gate)


def _hardtanh_check(values: Mapping[str, Any]) -> str | None:
    if values["min_val"] > values["max_val"]:
        return (
            f"hardtanh needs min_val <= max_val, got min_val={values['min_val']} "
            f"and max_val={values['max_val']}"
        )
    return None


_BIG = 1e6
_ALPHA_DOC = "scale of the negative saturation"


def _build() -> dict[str, Activation]:
    slope = FloatParam("negative_slope", 0.01, -_BIG, _BIG, doc="slope for x < 0")
    entries = [
        Activation("relu", "max(0, x)", F.relu, torch.relu_, torch_ref="F.relu"),
        Activation(
            "leaky_relu", "max(0, x) + negative_slope * min(0, x)",
            lambda x, negative_slope: F.leaky_relu(x, negative_slope),
            lambda x, negative_slope: F.leaky_relu_(x, negative_slope),
            (slope,), "F.leaky_relu",
        ),
        Activation("sigmoid", "1 / (1 + exp(-x))", torch.sigmoid, torch.sigmoid_,
                   torch_ref="torch.sigmoid"),
        Activation("tanh", "(exp(x) - exp(-x)) / (exp(x) + exp(-x))", torch.tanh,
                   torch.tanh_, torch_ref="torch.tanh"),
        Activation(
            "elu", "x if x > 0 else alpha * (exp(x) - 1)",
            lambda x, alpha: F.elu(x, alpha),
            lambda x, alpha: F.elu_(x, alpha),
            (FloatParam("alpha", 1.0, 0.0, _BIG, doc=_ALPHA_DOC),), "F.elu",
        ),
        Activation("relu_sigmoid", "relu(x) * sigmoid(x)", _relu_sigmoid, _relu_sigmoid_,
                   torch_ref="F.relu(x) * torch.sigmoid(x)"),
        Activation(
            "gelu", "x * Phi(x)  (approximate='tanh': tanh approximation)",
            lambda x, approximate: F.gelu(x, approximate=approximate), None,
            (ChoiceParam("approximate", "none", ("none", "tanh")),), "F.gelu",
        ),
        Activation("silu", "x * sigmoid(x)", F.silu, lambda x: F.silu(x, inplace=True),
                   torch_ref="F.silu"),
        Activation("mish", "x * tanh(softplus(x))", F.mish,
                   lambda x: F.mish(x, inplace=True), torch_ref="F.mish"),
        Activation(
            "softplus", "1/beta * log(1 + exp(beta * x)), linear above threshold",
            lambda x, beta, threshold: F.softplus(x, beta, threshold), None,
            (FloatParam("beta", 1.0, 0.0, _BIG, min_inclusive=False),
             FloatParam("threshold", 20.0, 0.0, _BIG, min_inclusive=False)),
            "F.softplus",
        ),
        Activation("selu", "scale * (max(0, x) + min(0, alpha * (exp(x) - 1)))", F.selu,
                   lambda x: F.selu(x, inplace=True), torch_ref="F.selu"),
        Activation(
            "celu", "max(0, x) + min(0, alpha * (exp(x / alpha) - 1))",
            lambda x, alpha: F.celu(x, alpha),
            lambda x, alpha: F.celu(x, alpha, inplace=True),
            (FloatParam("alpha", 1.0, 0.0, _BIG, min_inclusive=False, doc=_ALPHA_DOC),),
            "F.celu",
        ),
        Activation(
            "hardtanh", "clamp(x, min_val, max_val)",
            lambda x, min_val, max_val: F.hardtanh(x, min_val, max_val),
            lambda x, min_val, max_val: F.hardtanh(x, min_val, max_val, inplace=True),
            (FloatParam("min_val", -1.0, -_BIG, _BIG), FloatParam("max_val", 1.0, -_BIG, _BIG)),
            "F.hardtanh", _hardtanh_check,
        ),
        Activation("relu6", "min(max(0, x), 6)", F.relu6, lambda x: F.relu6(x, inplace=True),
                   torch_ref="F.relu6"),
        Activation("hardsigmoid", "clamp(x / 6 + 1/2, 0, 1)", F.hardsigmoid,
                   lambda x: F.hardsigmoid(x, inplace=True), torch_ref="F.hardsigmoid"),
        Activation("hardswish", "x * clamp(x + 3, 0, 6) / 6", F.hardswish,
                   lambda x: F.hardswish(x, inplace=True), torch_ref="F.hardswish"),
        Activation("logsigmoid", "log(1 / (1 + exp(-x)))", F.logsigmoid,
                   torch_ref="F.logsigmoid"),
        Activation("softsign", "x / (1 + |x|)", F.softsign, torch_ref="F.softsign"),
        Activation("tanhshrink", "x - tanh(x)", F.tanhshrink, torch_ref="F.tanhshrink"),
    ]
    return {a.name: a for a in entries}


def _no_expr(x: torch.Tensor) -> torch.Tensor:
    raise InvalidRequest("expr: send the expression to compute (field or parameter 'expr')")


# The name of inline expressions (``inline.py``): known to every registry, listed by none;
# ``JobFactory.build`` swaps it for the request's own expression.
INLINE = Activation("expr", "the request's own expr (see POST /v1/activations)", _no_expr,
                    torch_ref="the expression's torch composition")


class Registry:
    """Name -> Activation. Built by ``create_app``; never at import time of the app."""

    def __init__(self, activations: Mapping[str, Activation] | None = None) -> None:
        self._by_name = dict(activations) if activations is not None else _build()

    def get(self, name: str) -> Activation:
        if name == INLINE.name:
            return INLINE
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownActivation(
                f"unknown activation {echo(name)}; see GET /v1/activations for the list"
            ) from None

    def add(self, activation: Activation) -> None:
        """A custom activation (``custom.py``), after its probe and self-test passed."""
        self._by_name[activation.name] = activation

    def remove(self, name: str) -> None:
        self._by_name.pop(name, None)

    def find(self, name: str) -> Activation | None:
        return INLINE if name == INLINE.name else self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def __iter__(self):
        # a snapshot: a restarted executor's checks iterate in the compute thread while the
        # loop may register a custom activation
        return iter(list(self._by_name.values()))
