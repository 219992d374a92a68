"""The one check of client numbers and strings at the edge, used by every decoder (native,
v2, gRPC through the v2 codec) and by the registration path: numbers that overflow a float,
strings with lone surrogates or control characters, names the routes reserve.

Torch-free and a leaf (it imports only ``service.errors``), so the engine's torch-free
validators and the codecs share it. Every refusal is an ``InvalidRequest`` (400) or a
``Conflict`` (409) naming the field; nothing here can raise anything else.
"""

from __future__ import annotations

import math
import re

from service.errors import Conflict, InvalidRequest, echo

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# A JSON escape of a surrogate code point: only a body holding one can decode to a lone
# surrogate (the UTF-8 decoder refuses encoded surrogates), so only such a body is walked.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

# Names a custom activation may not take: each is a path segment a route matches before
# (or instead of) a model name (``/v2/models/stats``; ``expr`` is the inline activation).
RESERVED_NAMES = frozenset({"expr", "stats"})


def number(raw: object, where: str, *, strings: bool = False) -> float:
    """A finite number as a float; 400 naming ``where`` for a boolean, a non-number (a
    numeric string only with ``strings``: query strings, v2 string parameters), an integer
    beyond any float (a 400-digit literal) or a non-finite value."""
    if isinstance(raw, bool):
        raise InvalidRequest(f"{where} must be a number, got a boolean")
    if strings and isinstance(raw, str):
        try:
            raw = float(raw) if len(raw) <= 64 else math.inf
        except ValueError:
            raise InvalidRequest(f"{where} must be a number, got {echo(raw)}") from None
    if not isinstance(raw, (int, float)):
        raise InvalidRequest(f"{where} must be a number, got {echo(raw)}")
    try:
        value = float(raw)
    except OverflowError:  # an integer beyond float's range
        value = math.inf
    if not math.isfinite(value):
        raise InvalidRequest(f"{where} must be a finite number (at most about 1.8e308 in "
                             f"magnitude), got {echo(raw)}")
    return value


def text(raw: object, where: str, max_chars: int) -> str:
    """A string of at most ``max_chars`` characters with no lone surrogate and no control
    character (which could not be written back as UTF-8, or would forge lines in logs)."""
    if not isinstance(raw, str) or len(raw) > max_chars:
        raise InvalidRequest(f"{where} must be a string of at most {max_chars} characters")
    if _LONE_SURROGATE.search(raw):
        raise InvalidRequest(f"{where} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape): not a Unicode character")
    if _CONTROL.search(raw):
        raise InvalidRequest(f"{where} holds a control character (U+0000-U+001F, "
                             "U+007F-U+009F)")
    return raw


def refuse_lone_surrogates(obj: object, where: str = "body") -> None:
    """400 naming the first key or string of a parsed JSON document that holds a lone
    surrogate (Python's JSON decoder keeps them; they cannot be encoded back to UTF-8, so
    one stored and echoed later would fail every answer that carries it). Walked without
    recursion; values other than dicts, lists and strings are leaves."""
    stack: list[tuple[object, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                raise InvalidRequest(f"{path} holds a lone surrogate (an unpaired "
                                     "\\ud800-\\udfff escape): not a Unicode character")
        elif isinstance(value, dict):
            for k, v in value.items():
                key = k if isinstance(k, str) and not _LONE_SURROGATE.search(k) else None
                if key is None:
                    raise InvalidRequest(f"{path}: a key holds a lone surrogate (an unpaired "
                                         "\\ud800-\\udfff escape): not a Unicode character")
                stack.append((v, f"{path}.{key[:40]}"))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value)
                         if isinstance(v, (str, dict, list)))


def reserved(name: str) -> None:
    """409 for a custom activation name a route already takes."""
    if name in RESERVED_NAMES:
        raise Conflict(f"the name {name!r} is reserved (it is a path the API routes itself: "
                       f"{', '.join(sorted(RESERVED_NAMES))}); choose another")
