"""Custom activation expressions: a small, safe grammar over one tensor ``x``.

Text is parsed with Python's ``ast`` (never ``eval``/``compile``), checked node by node
into a tree of the few forms allowed below, and evaluated by walking that tree with torch
calls. Anything else is refused with the column it starts at and what is allowed.

    expr  := number | x | PARAM | -expr | +expr | expr (+ - * / **) expr
           | FUNC(expr) | maximum(expr, expr) | minimum(expr, expr)
           | clamp(expr, number-or-param, number-or-param)
           | expr if x-expr (< <= > >=) expr else expr       (torch.where)

Constant arithmetic (no ``x``) is done in float64 with IEEE results (never an exception);
a function or a comparison must depend on ``x``. The torch calls are exactly what a
hand-written composition would call, so the served result equals that composition applied
to the request alone, bit for bit.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from service.errors import InvalidRequest, echo

MAX_CHARS = 512
MAX_NODES = 128
MAX_DEPTH = 32

FUNCS = {
    "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp,
    "expm1": torch.expm1, "log": torch.log, "log1p": torch.log1p, "abs": torch.abs,
    "sqrt": torch.sqrt, "softplus": F.softplus, "gelu": F.gelu, "silu": F.silu,
    "mish": F.mish, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos,
    # nn.ELU(): its kernel takes expm1 in the vector body and exp(x) - 1 in the scalar tail,
    # so no composition of the others gives its bits; elu(x) is F.elu (alpha 1)
    "elu": F.elu,
}
PAIRS = {"maximum", "minimum"}
ALLOWED = ("numbers, x, declared params, + - * / ** (unary -/+), "
           + ", ".join(sorted(FUNCS)) + ", maximum(a, b), minimum(a, b), clamp(a, lo, hi), "
           "'a if <x comparison> else b'")
_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


@dataclass(frozen=True)
class Node:
    op: str                  # "num", "x", "param", "neg", a _BIN symbol, a func, "clamp", "where"
    args: tuple = ()         # child Nodes (for "num"/"param": the value / the name)
    cmp: str = ""            # "where": the comparison
    tensor: bool = False     # depends on x

    def __str__(self) -> str:
        if self.op == "num":
            return repr(self.args[0])
        if self.op == "x":
            return "x"
        if self.op == "param":
            return self.args[0]
        if self.op == "neg":
            return f"(-{self.args[0]})"
        if self.op in _BIN.values():
            return f"({self.args[0]} {self.op} {self.args[1]})"
        if self.op == "where":
            a, b, yes, no = self.args
            return f"({yes} if {a} {self.cmp} {b} else {no})"
        return f"{self.op}({', '.join(str(a) for a in self.args)})"


@dataclass(frozen=True)
class Expression:
    tree: Node
    params: tuple[str, ...]

    @property
    def normalized(self) -> str:
        return str(self.tree)

    def __call__(self, x: torch.Tensor, **params: float) -> torch.Tensor:
        return _eval(self.tree, x, params)


def parse(text: object, params: tuple[str, ...] = (), where: str = "expr") -> Expression:
    """Check ``text`` into an ``Expression`` over ``x`` and ``params``; InvalidRequest if not."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{where} must be a string, got {echo(text)}")
    if not text.strip():
        raise InvalidRequest(f"{where} is empty")
    if len(text) > MAX_CHARS:
        raise InvalidRequest(f"{where} is {len(text)} characters; at most {MAX_CHARS}")
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        col = getattr(exc, "offset", None)
        at = f" at column {col}" if col else ""
        raise InvalidRequest(f"{where}: not a valid expression{at}; allowed: {ALLOWED}") from None
    _bounds(body, where)
    tree = _Checker(set(params), where, len(text) - len(text.lstrip())).check(body)
    if not tree.tensor:
        raise InvalidRequest(f"{where} must depend on x")
    return Expression(tree, tuple(params))


def _bounds(root: ast.AST, where: str) -> None:
    """Node count and depth, walked without recursion (the tree may be deep)."""
    stack, count = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise InvalidRequest(f"{where} has more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"{where} nests deeper than {MAX_DEPTH} levels "
                                 f"(at column {getattr(node, 'col_offset', 0) + 1})")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


class _Checker:
    def __init__(self, params: set[str], where: str, lead: int = 0) -> None:
        self.params, self.where, self.lead = params, where, lead  # lead: stripped spaces

    def fail(self, node: ast.AST, what: str) -> InvalidRequest:
        col = node.col_offset + self.lead + 1
        return InvalidRequest(f"{self.where}: {what} at column {col} is not allowed; "
                              f"allowed: {ALLOWED}")

    def check(self, n: ast.AST) -> Node:
        if isinstance(n, ast.Constant):
            if isinstance(n.value, bool) or not isinstance(n.value, (int, float)):
                raise self.fail(n, f"the constant {echo(n.value)}")
            try:
                value = float(n.value)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise self.fail(n, "a number beyond float64 range")
            return Node("num", (value,))
        if isinstance(n, ast.Name):
            if n.id == "x":
                return Node("x", tensor=True)
            if n.id in self.params:
                return Node("param", (n.id,))
            names = ", ".join(["x", *sorted(self.params)])
            raise InvalidRequest(f"{self.where}: unknown name {echo(n.id)} at column "
                                 f"{n.col_offset + self.lead + 1}; names: {names} "
                                 "(declare params to use more)")
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            inner = self.check(n.operand)
            return inner if isinstance(n.op, ast.UAdd) else Node("neg", (inner,),
                                                                 tensor=inner.tensor)
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            a, b = self.check(n.left), self.check(n.right)
            return Node(_BIN[type(n.op)], (a, b), tensor=a.tensor or b.tensor)
        if isinstance(n, ast.Call):
            return self.call(n)
        if isinstance(n, ast.IfExp):
            test = n.test
            if not (isinstance(test, ast.Compare) and len(test.ops) == 1
                    and type(test.ops[0]) in _CMP):
                raise self.fail(test, "this condition (use one comparison: < <= > >=)")
            a, b = self.check(test.left), self.check(test.comparators[0])
            if not (a.tensor or b.tensor):
                raise self.fail(test, "a condition that does not depend on x")
            yes, no = self.check(n.body), self.check(n.orelse)
            if not (yes.tensor or no.tensor):
                raise self.fail(n, "a choice between two constants")
            return Node("where", (a, b, yes, no), _CMP[type(test.ops[0])], tensor=True)
        raise self.fail(n, f"{type(n).__name__}")

    def call(self, n: ast.Call) -> Node:
        if not isinstance(n.func, ast.Name) or n.keywords:
            raise self.fail(n, "this call")
        name = n.func.id
        arity = 1 if name in FUNCS else 2 if name in PAIRS else 3 if name == "clamp" else 0
        if not arity:
            raise self.fail(n, f"the function {echo(name)}")
        args = [self.check(a) for a in n.args]
        if len(args) != arity:
            raise self.fail(n, f"{name} with {len(args)} arguments (takes {arity})")
        if not args[0].tensor and not (name in PAIRS and args[1].tensor):
            raise self.fail(n, f"{name} of an argument that does not depend on x")
        if name == "clamp" and (args[1].tensor or args[2].tensor):
            raise self.fail(n, "clamp bounds that depend on x (use maximum/minimum)")
        return Node(name, tuple(args), tensor=True)


def _scalar(op: str, a: float, b: float) -> float:
    with np.errstate(all="ignore"):
        x, y = np.float64(a), np.float64(b)
        r = (x + y if op == "+" else x - y if op == "-" else x * y if op == "*"
             else np.divide(x, y) if op == "/" else np.power(x, y))
    return float(r)


def _range(dtype: torch.dtype) -> tuple[float, float]:
    """``dtype``'s largest finite number, and the smallest magnitude a cast rounds to
    infinity (round to nearest even: the largest plus half a step of the top binade)."""
    finfo = torch.finfo(dtype)
    top = float(finfo.max)
    mantissa_bits = -math.frexp(float(finfo.eps))[1] + 1  # eps = 2**-mantissa_bits
    return top, top + 2.0 ** (math.frexp(top)[1] - 1 - mantissa_bits - 1)


_RANGE = {d: _range(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def _fit(v: float, like: torch.Tensor) -> float:
    """A scalar beyond ``like``'s dtype range, rounded as a cast would (to +-inf, or to the
    largest number): torch refuses such scalars in where/clamp instead of rounding them. The
    range comes from a table made at import and ``v`` is only compared, so ``torch.compile``
    traces this as plain Python (``math.isfinite`` on a traced float broke every compile of
    ``maximum(x, 0)``)."""
    top, overflow = _RANGE[like.dtype]
    if top < abs(v) < math.inf:  # comparisons only: torch.compile may trace v symbolically
        if like.dtype in (torch.float16, torch.bfloat16):
            with np.errstate(over="ignore"):
                v = float(np.float32(v))  # torch casts float64 to 16 bits through float32
        return math.copysign(math.inf if abs(v) >= overflow else top, v)
    return v


def _eval(n: Node, x: torch.Tensor, params: Mapping[str, float]):
    op = n.op
    if op == "x":
        return x
    if op == "num":
        return n.args[0]
    if op == "param":
        return float(params[n.args[0]])
    if op == "neg":
        return -_eval(n.args[0], x, params)
    if op in ("+", "-", "*", "/", "**"):
        a, b = _eval(n.args[0], x, params), _eval(n.args[1], x, params)
        if not n.tensor:
            return _scalar(op, a, b)
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        return a ** b
    if op == "where":
        a, b, yes, no = (_eval(c, x, params) for c in n.args)
        cond = (a < b if n.cmp == "<" else a <= b if n.cmp == "<=" else a > b
                if n.cmp == ">" else a >= b)
        if not isinstance(yes, torch.Tensor):
            yes = _fit(yes, no)
        if not isinstance(no, torch.Tensor):
            no = _fit(no, yes)
        return torch.where(cond, yes, no)
    if op == "clamp":
        a, lo, hi = (_eval(c, x, params) for c in n.args)
        return torch.clamp(a, _fit(lo, a), _fit(hi, a))
    if op in PAIRS:
        a, b = (_eval(c, x, params) for c in n.args)
        if not isinstance(a, torch.Tensor):
            a, b = b, a
        if not isinstance(b, torch.Tensor):
            b = _fit(b, a)
            return torch.clamp(a, min=b) if op == "maximum" else torch.clamp(a, max=b)
        return torch.maximum(a, b) if op == "maximum" else torch.minimum(a, b)
    return FUNCS[op](_eval(n.args[0], x, params))
