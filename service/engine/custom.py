"""Custom activations: an expression (``expressions.py``) with declared float params, served
like any built-in one (catalogue, v2 model, probe and self-test before it is served).

Built here from the raw registration (JSON or a TOML table); torch-free apart from the
expression's evaluation, which only ever runs in a compute thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import tomllib

from service.engine import batchnorm, expressions
from service.engine.activations import Activation
from service.engine.fusion import MAX_ULP, Slot
from service.engine.params import BoolParam, FloatParam, refuse_unknown
from service.errors import Conflict, InvalidRequest, echo
from service.validation import number, reserved, text

NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_PARAMS = 8
MAX_DESCRIPTION = 500
_BIG = 1e6


@dataclass(frozen=True)
class CustomActivation(Activation):
    expression: expressions.Expression | None = None
    batch_norm: batchnorm.BatchNorm | None = None
    description: str = ""
    fusion: Slot = field(default_factory=Slot, compare=False, repr=False)

    def describe(self) -> dict:
        out = {**super().describe(), "custom": True}
        if self.description:
            out["description"] = self.description
        if self.batch_norm is not None:
            out["batch_norm"] = self.batch_norm.describe()
        fused = self.fusion.describe()
        if fused is not None:  # None: decided in the engine process, not shown here
            out["fusion"] = fused
        return out

    def apply(self, x, inplace: bool, params: tuple):
        """Eager (``Activation.apply``), or the compiled form once ``fusion.py`` has chosen
        it and it serves this tensor (never for in-place: that stays eager, refused)."""
        fused = self.fusion.entry
        if inplace or fused is None or fused.state != "compiled":
            return super().apply(x, inplace, params)
        values = dict(params)
        batch_stats = values.pop("batch_stats", False)
        if not fused.takes(x, values):
            return super().apply(x, inplace, params)
        if self.batch_norm is not None:
            x = self.batch_norm.apply(x, batch_stats)
        return fused(x)

    @property
    def packs(self) -> bool:
        return self.batch_norm is None  # a batch norm reads channels (and batch statistics)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        return self.batch_norm.check_shape(shape) if self.batch_norm is not None else None

    def example_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.batch_norm.channels) if self.batch_norm is not None else (n,)


def build(raw: object, where: str = "activation") -> CustomActivation:
    """``{"name": ..., "expr": ..., "params": {"alpha": {"default": 1.0, "min": ...,
    "max": ..., "doc": ...}, ...}}`` (a param may also be given as just its default)."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object with name and expr")
    refuse_unknown(raw, ("name", "expr", "params", "batch_norm", "batchnorm", "description",
                         "fusion"), where,
                   "name, expr, params, batch_norm (or batchnorm), description, fusion")
    if "batch_norm" in raw and "batchnorm" in raw:
        raise InvalidRequest(f"{where}: give batch_norm or its spelling batchnorm, not both")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"{where}: name must match [a-z][a-z0-9_]{{0,63}}, got {echo(name)}")
    if name == "expr":
        raise Conflict("the name 'expr' is reserved for inline expressions")
    reserved(name)  # 409 for any other path segment a route takes (/v2/models/stats)
    params = _params(raw.get("params") or {}, f"{where}.params")
    description = text(raw.get("description", ""), f"{where}.description", MAX_DESCRIPTION)
    expr = expressions.parse(raw.get("expr"), tuple(p.name for p in params), f"{where}.expr")
    asked = _fusion(raw.get("fusion"), f"{where}.fusion")
    bn_key = "batchnorm" if "batchnorm" in raw else "batch_norm"
    if raw.get(bn_key) is None:
        act = from_expression(name, expr, params, description)
        act.fusion.asked = asked
        return act
    bn = batchnorm.parse(raw[bn_key], f"{where}.{bn_key}")

    def layer(x, batch_stats: bool = False, **values):
        return expr(bn.apply(x, batch_stats), **values)

    stats = BoolParam("batch_stats", False, doc="normalise with this request's own statistics")
    act = CustomActivation(name, f"{expr.normalized} on x = batch_norm(input)", layer, None,
                           (*params, stats), torch_ref=f"F.batch_norm then {expr.normalized}",
                           expression=expr, batch_norm=bn, description=description)
    act.fusion.asked = asked
    return act


def _fusion(raw: object, where: str) -> int | None:
    """A registration's fusion request: absent, null or false (eager), true (compiled where
    bit for bit the eager form), or ``{"max_ulp": N}`` (compiled where within N ULPs of it,
    0 <= N <= fusion.MAX_ULP). The ULP bound accepted, or None."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return 0
    if isinstance(raw, Mapping):
        refuse_unknown(raw, ("max_ulp",), where, "max_ulp")
        n = raw.get("max_ulp", 0)
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ULP:
            return n
    raise InvalidRequest(f"{where} must be true, false or {{\"max_ulp\": N}} with N an integer "
                         f"in [0, {MAX_ULP}] (ULPs of the answer's dtype), got {echo(raw)}")


def file_entries(path: str) -> list[tuple[object, str]]:
    """``--activations-file``: the raw ``[[activation]]`` tables of a TOML file, each with
    the name of its place in the file (for messages); OSError or TOMLDecodeError as raised."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return [(raw, f"{path}: activation[{i}]") for i, raw in enumerate(doc.get("activation", []))]


def from_expression(name: str, expr: expressions.Expression,
                    params: tuple[FloatParam, ...] = (), description: str = "") -> CustomActivation:
    return CustomActivation(name, expr.normalized, expr, None, params,
                            torch_ref=expr.normalized, expression=expr, description=description)


def _params(raw: object, where: str) -> tuple[FloatParam, ...]:
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object of name: spec")
    if len(raw) > MAX_PARAMS:
        raise InvalidRequest(f"{where}: at most {MAX_PARAMS} params")
    out = []
    for pname, spec in raw.items():
        if not isinstance(pname, str) or not NAME.fullmatch(pname) or pname in ("x", "batch_stats") \
                or pname in expressions.FUNCS or pname in ("maximum", "minimum", "clamp"):
            raise InvalidRequest(f"{where}: {echo(pname)} is not a usable param name")
        if not isinstance(spec, Mapping):
            spec = {"default": spec}
        refuse_unknown(spec, ("default", "min", "max", "doc"), f"{where}.{pname}")
        low = _num(spec.get("min", -_BIG), f"{where}.{pname}.min")
        high = _num(spec.get("max", _BIG), f"{where}.{pname}.max")
        if "default" not in spec:
            raise InvalidRequest(f"{where}.{pname}: a default is needed")
        default = _num(spec["default"], f"{where}.{pname}.default")
        if not low <= default <= high:
            raise InvalidRequest(f"{where}.{pname}: default {default} is outside "
                                 f"[{low}, {high}]")
        doc = text(spec.get("doc", ""), f"{where}.{pname}.doc", 200)  # served back as JSON
        out.append(FloatParam(pname, default, low, high, doc=doc))
    return tuple(out)


def _num(raw: object, where: str) -> float:
    value = number(raw, where)  # 400 for a boolean, a 400-digit integer, a non-finite value
    if not -_BIG <= value <= _BIG:
        raise InvalidRequest(f"{where} must be a number in [-{_BIG:g}, {_BIG:g}], got {echo(raw)}")
    return value
