"""Activation parameter schemas: declared once, validated per request, served in the catalogue.

Torch-free: the event loop validates requests with these before anything is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import InvalidRequest, echo
from service.validation import number


def refuse_unknown(raw, allowed: tuple[str, ...], where: str, shown: str = "") -> None:
    """400 naming the first field of ``raw`` that is not in ``allowed``."""
    unknown = set(raw) - set(allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field {echo(sorted(unknown)[0])}; allowed: "
                             f"{shown or ', '.join(allowed)}")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class FloatParam:
    name: str
    default: float
    min: float
    max: float
    min_inclusive: bool = True
    doc: str = ""

    def parse(self, raw: object, where: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            number(raw, f"{where}: {self.name}")  # the edge check's 400 naming why
        try:
            value = float(raw)
        except ValueError:
            raise InvalidRequest(f"{where}: {self.name} must be a number, got {echo(raw)}") from None
        except OverflowError:  # a 400-digit integer: out of range below, never a 500
            value = math.inf
        low_ok = value >= self.min if self.min_inclusive else value > self.min
        if not math.isfinite(value) or not low_ok or value > self.max:
            low = "[" if self.min_inclusive else "("
            raise InvalidRequest(
                f"{where}: {self.name}={echo(raw)} is out of range; allowed {low}{self.min}, "
                f"{self.max}]"
            )
        return value

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": "float",
            "default": self.default,
            "min": self.min,
            "min_inclusive": self.min_inclusive,
            "max": self.max,
            "doc": self.doc,
        }


@dataclass(frozen=True)
class ChoiceParam:
    name: str
    default: str
    choices: tuple[str, ...]
    doc: str = ""

    def parse(self, raw: object, where: str) -> str:
        if not isinstance(raw, str) or raw not in self.choices:
            raise InvalidRequest(
                f"{where}: {self.name}={echo(raw)} is not allowed; choose one of "
                f"{', '.join(self.choices)}"
            )
        return raw

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": "string",
            "default": self.default,
            "choices": list(self.choices),
            "doc": self.doc,
        }


@dataclass(frozen=True)
class BoolParam:
    name: str
    default: bool = False
    doc: str = ""

    def parse(self, raw: object, where: str) -> bool:
        return parse_bool(raw, self.name, where)

    def describe(self) -> dict:
        return {"name": self.name, "type": "bool", "default": self.default, "doc": self.doc}


Param = FloatParam | ChoiceParam | BoolParam


def parse_bool(raw: object, name: str, where: str) -> bool:
    """Booleans from JSON (true/false) or from query strings (true/1/yes/on...)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    raise InvalidRequest(f"{where}: {name} must be true or false, got {echo(raw)}")
