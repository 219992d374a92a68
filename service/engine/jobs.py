"""Per-request settings shared by every API: compute dtype, amp, in-place, timeout, priority,
activation params. Validated here, before anything is queued. Torch-free (the activation
and capability types are only named for type checkers).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from service import dtypes
from service.engine import reports
from service.engine.job import OUTPUTS, VALUE_ONLY, Job, Mode
from service.engine.params import parse_bool
from service.errors import InvalidRequest, RequestTooLarge, echo
from service.settings import Settings
from service.validation import number

if TYPE_CHECKING:
    from service.engine.activations import Activation
    from service.engine.capabilities import Capabilities

INLINE_NAME = "expr"  # activations.INLINE

# When the request being handled in this task arrived (time.monotonic): set by the exchange
# sequence (``service/exchange/sequence.py``); a job's deadline counts from it, so the time
# a request spent in the server before it was decoded (waiting for the event loop, its body
# arriving) is part of its timeout, as it is of its caller's.
ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("actserve_arrived",
                                                                       default=None)


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
        parsed = activation.parse_params(params, where)
        bn = getattr(activation, "batch_norm", None)
        if bn is not None and dict(parsed).get("batch_stats"):
            problem = bn.batch_stats_problem(array.shape)
            if problem:
                raise InvalidRequest(f"{where}: {problem}")
        self._admit_working_set(activation, array, wire_dtype, compute or wire_dtype,
                                outputs, report, grad_output is not None, where)
        return Job(
            activation=activation,
            params=parsed,
            array=array,
            wire_dtype=wire_dtype,
            mode=mode,
            deadline=(ARRIVED.get() or time.monotonic()) + timeout_s,
            priority=int(priority),
            api=api,
            outputs=outputs,
            grad_output=grad_output,
            report=report,
        )

    def _admit_working_set(self, activation: Activation, array: np.ndarray, wire: str,
                           compute: str, outputs: tuple[str, ...], report: frozenset,
                           upstream: bool, where: str) -> None:
        """413 when the memory this request needs while it is computed (``working_set``)
        is over ``WORKING_SET_BYTES_PER_ELEMENT * max_batch_elements``: what a full batch of
        plain requests may use. Work grows with the same terms, so this bounds how long one
        request can hold a compute thread (and every request queued behind it) too."""
        limit = WORKING_SET_BYTES_PER_ELEMENT * self.settings.max_batch_elements
        if (array.size * PLAIN_BYTES_PER_ELEMENT <= limit and outputs == VALUE_ONLY
                and not report and not upstream
                and getattr(activation, "expression", None) is None):
            return  # a plain built-in's most (float64 batch norm) fits: nothing to add up
        need = working_set(array.size, dtypes.itemsize(wire), dtypes.itemsize(compute),
                           tensor_ops(activation), outputs, report, upstream)
        if need > limit:
            raise RequestTooLarge(
                f"{where}: this request's working set is about {need >> 20} MiB "
                f"({array.size} elements, compute dtype {compute}, {tensor_ops(activation)} "
                f"tensor operation(s), outputs {','.join(outputs)}"
                f"{', report ' + ','.join(sorted(report)) if report else ''}), over the "
                f"server's bound of {limit >> 20} MiB ({WORKING_SET_BYTES_PER_ELEMENT} bytes x "
                f"max_batch_elements={self.settings.max_batch_elements}); send fewer elements, "
                "or ask for fewer outputs and reports")

    def _lab(self, settings: Mapping[str, object], grad_output: np.ndarray | None,
             array: np.ndarray, inplace: bool, where: str) -> tuple[tuple[str, ...], frozenset]:
        """The answers and reports a request asks for, checked (docs/lab.md)."""
        outputs = _names(settings.get("outputs"), OUTPUTS, "outputs", where) or VALUE_ONLY
        asked = settings.get("report")
        report = (frozenset(_names(asked, reports.names(), "report", where))
                  if asked is not None else NO_REPORTS)
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
        for name in report:  # e.g. profiles need --allow-profile
            reports.REGISTRY[name].check(self.settings, where)
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


# A request may hold at most this many bytes per element of max_batch_elements while it is
# computed: 64 (256 MiB with the default 4 Mi elements). A full batch of plain float32
# requests needs 16 (wire input, compute copy, output).
WORKING_SET_BYTES_PER_ELEMENT = 64
NO_REPORTS: frozenset[str] = frozenset()


def tensor_ops(activation: Activation) -> int:
    """Tensor-valued operations of one evaluation: the nodes of a custom expression that
    depend on x (each may be alive at once: autograd keeps them all), 1 for a built-in; a
    batch norm adds two."""
    expr = getattr(activation, "expression", None)
    ops = 1
    if expr is not None:
        ops, stack = 0, [expr.tree]
        while stack:
            node = stack.pop()
            ops += bool(node.tensor) and node.op != "x"
            stack.extend(a for a in node.args if hasattr(a, "tensor"))
        ops = max(ops, 1)
    return ops + (2 if getattr(activation, "batch_norm", None) is not None else 0)


def working_set(n: int, wire: int, compute: int, ops: int, outputs: tuple[str, ...],
                report: frozenset, upstream: bool) -> int:
    """Bytes a request of ``n`` elements holds while computed, counted per element: its wire
    input, the compute copy and the answer, one compute-dtype tensor per operation (the
    intermediates); a gradient keeps every intermediate for autograd and adds the
    gradient's own tensors (and the upstream gradient's); a numerics report recomputes the
    request in float64 and in float32 and compares them (float64 temporaries)."""
    per = wire + 2 * compute + compute * ops
    if "grad" in outputs:
        per += compute * (ops + 2) + wire
    if upstream:
        per += wire + compute
    for name in report:  # e.g. numerics: float64 temporaries (service/engine/reports)
        per += reports.REGISTRY[name].bytes_per_element(ops)
    return n * per


# The most a built-in activation's value alone needs per element (float64 everywhere, a
# batch norm's three tensor operations), from ``working_set`` itself: a request this small
# needs no sum (``JobFactory._admit_working_set``).
PLAIN_BYTES_PER_ELEMENT = working_set(1, 8, 8, 3, VALUE_ONLY, NO_REPORTS, False)


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
    return number(raw, f"{where}: {name}", strings=True)  # never an OverflowError (a 500)
