"""Per-request settings shared by every API: compute dtype, amp, in-place, timeout, priority,
activation params. Validated here, before anything is queued. Torch-free (the activation
and capability types are only named for type checkers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from service import dtypes
from service.engine.job import OUTPUTS, REPORTS, VALUE_ONLY, Job, Mode
from service.engine.params import parse_bool
from service.errors import InvalidRequest, echo
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine.activations import Activation
    from service.engine.capabilities import Capabilities

INLINE_NAME = "expr"  # activations.INLINE


class JobFactory:
    """Turns decoded arrays and raw settings into validated ``Job`` objects."""

    def __init__(self, settings: Settings, capabilities: Capabilities,
                 inline: Callable[[object], Activation]) -> None:
        self.settings = settings
        self.capabilities = capabilities
        self.inline = inline  # text -> the inline expression's activation (inline.py)

    def build(
        self,
        activation: Activation,
        array: np.ndarray,
        wire_dtype: str,
        settings: Mapping[str, object],
        params: Mapping[str, object],
        *,
        api: str,
        timeout_unit_s: float = 1.0,
        where: str = "request",
        grad_output: np.ndarray | None = None,
    ) -> Job:
        s = self.settings
        activation = self._expression(activation, settings.get("expr"), where)
        compute = settings.get("compute_dtype", s.default_compute_dtype)
        if compute is not None:
            compute = dtypes.check_name(compute, "compute_dtype")
        amp = parse_bool(settings.get("amp", s.default_amp), "amp", where)
        amp_dtype = settings.get("amp_dtype")
        if amp_dtype is not None:
            if amp_dtype not in ("float16", "bfloat16"):
                raise InvalidRequest(
                    f"{where}: amp_dtype={echo(amp_dtype)} is not allowed; choose float16 or bfloat16"
                )
            if not amp:
                raise InvalidRequest(f"{where}: amp_dtype is set but amp is false")
        inplace = parse_bool(settings.get("inplace", s.default_inplace), "inplace", where)
        timeout = _number(settings.get("timeout"), "timeout", where)
        if timeout is None:
            timeout_s = s.default_timeout_s
        else:
            if timeout <= 0:
                raise InvalidRequest(f"{where}: timeout must be > 0, got {echo(timeout)}")
            timeout_s = timeout * timeout_unit_s
        priority = _number(settings.get("priority"), "priority", where) or 0
        if priority != int(priority) or abs(priority) > s.max_priority:
            raise InvalidRequest(f"{where}: priority must be an integer in [-{s.max_priority}, "
                                 f"{s.max_priority}], got {echo(priority)}")
        problem = activation.check_shape(array.shape)
        if problem:
            raise InvalidRequest(f"{where}: {problem}")
        mode = Mode(compute, amp, amp_dtype, inplace)
        self.capabilities.check(activation, compute or wire_dtype, mode)
        outputs, report = self._lab(settings, grad_output, array, inplace, where)
        return Job(
            activation=activation,
            params=activation.parse_params(params, where),
            array=array,
            wire_dtype=wire_dtype,
            mode=mode,
            deadline=time.monotonic() + timeout_s,
            priority=int(priority),
            api=api,
            outputs=outputs,
            grad_output=grad_output,
            report=report,
        )

    def _lab(self, settings: Mapping[str, object], grad_output: np.ndarray | None,
             array: np.ndarray, inplace: bool, where: str) -> tuple[tuple[str, ...], frozenset]:
        """The answers and reports a request asks for, checked (docs/lab.md)."""
        outputs = _names(settings.get("outputs"), OUTPUTS, "outputs", where) or VALUE_ONLY
        report = frozenset(_names(settings.get("report"), REPORTS, "report", where))
        if outputs == VALUE_ONLY and not report and grad_output is None:
            return VALUE_ONLY, report
        if grad_output is not None:
            if "grad" not in outputs:
                raise InvalidRequest(f"{where}: grad_output is the upstream gradient of a "
                                     "vector-Jacobian product; ask for it with outputs "
                                     "including grad")
            if grad_output.shape != array.shape or grad_output.dtype != array.dtype:
                raise InvalidRequest(
                    f"{where}: grad_output must have the input's shape {list(array.shape)} "
                    f"and dtype; got shape {list(grad_output.shape)}")
        if "grad" in outputs and inplace:
            raise InvalidRequest(
                f"{where}: inplace cannot be combined with a gradient: an in-place activation "
                "overwrites the input that autograd needs to compute the derivative (torch "
                "refuses in-place operations on a tensor that requires grad); send "
                "inplace=false")
        if "profile" in report and not self.settings.allow_profile:
            raise InvalidRequest(f"{where}: profiles are off on this server; start it with "
                                 "ACTSERVE_ALLOW_PROFILE=true (--allow-profile) to allow them")
        return outputs, report

    def _expression(self, activation: Activation, text: object, where: str) -> Activation:
        if activation.name != INLINE_NAME:
            if text is not None:
                raise InvalidRequest(f"{where}: expr is read only by the 'expr' activation "
                                     "(POST /v1/activations/expr, v2 model 'expr')")
            return activation
        if text is None:
            raise InvalidRequest(f"{where}: send the expression to compute as expr "
                                 "(JSON field, query or v2 parameter), e.g. relu(x) * sigmoid(x)")
        return self.inline(text)


def _names(raw: object, allowed: tuple[str, ...], what: str, where: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string (query strings, v2 parameters), in
    the canonical order of ``allowed``."""
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise InvalidRequest(f"{where}: {what} must be a list of names from "
                             f"{', '.join(allowed)}, got {echo(raw)}")
    names = {i.strip() for i in items if i.strip()}
    unknown = sorted(names - set(allowed))
    if unknown:
        raise InvalidRequest(f"{where}: unknown {what} {echo(unknown[0])}; choose from "
                             f"{', '.join(allowed)}")
    if what == "outputs" and items and not names:
        raise InvalidRequest(f"{where}: outputs is empty; ask for value, grad or both")
    return tuple(n for n in allowed if n in names)


def _number(raw: object, name: str, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise InvalidRequest(f"{where}: {name} must be a number, got a boolean")
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise InvalidRequest(f"{where}: {name} must be a number, got {echo(raw)}") from None
    if not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise InvalidRequest(f"{where}: {name} must be a finite number, got {echo(raw)}")
    return raw
