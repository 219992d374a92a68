"""JSON in and out, fast, with the non-finite tokens ``NaN``, ``Infinity``, ``-Infinity``.

orjson is the fast path both ways. It rejects the non-finite tokens on input and writes
``null`` for them on output, so a body with non-finite values goes through Python's json
module instead (which reads and writes those tokens, as Triton does).
"""

from __future__ import annotations

import json
import math

import numpy as np
import orjson

from service import dtypes
from service.errors import InvalidRequest, RequestTooLarge, echo

from . import jsonbound
from .jsonbound import MAX_DIMS


def loads_object(body: bytes | bytearray, max_values: int | None = None) -> dict:
    """A JSON object, its size and nesting bounded before it is parsed (``jsonbound.scan``:
    413 over ``max_values`` values, 400 deeper than ``MAX_DEPTH``); large bodies are parsed
    in slices."""
    jsonbound.scan(body, max_values)
    try:
        if len(body) >= jsonbound.SLICE_BYTES:
            obj = jsonbound.loads_sliced(body)
        else:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("body must be a JSON object")
    return obj


def dumps(obj: dict) -> bytes:
    """Serialise a response whose numeric payload sits in numpy arrays under any key."""
    try:
        if all(_finite(v) for v in obj.values()):
            return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
    except TypeError:
        pass
    return json.dumps(_plain(obj), allow_nan=True, separators=(",", ":")).encode()


def _finite(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim > 0 and bool(np.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _default(value):
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def array_from_json(data, shape, wire: str, where: str, max_elements: int) -> np.ndarray:
    """A number or (nested) list of numbers -> wire storage of ``wire``, C-contiguous and
    writable. With ``shape``, ``data`` may be flat (row-major) or nested to that shape."""
    if isinstance(data, bool) or not isinstance(data, (int, float, list, jsonbound.Slices)):
        raise InvalidRequest(f"{where} must be a number or a list of numbers, got {echo(data)}")
    try:
        if isinstance(data, jsonbound.Slices):  # parsed slice by slice: join the slices
            values = np.concatenate([np.array(p) for p in data.parts])
        else:
            values = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidRequest(
            f"{where} must be a rectangular (non-ragged) nested list of numbers"
        ) from None
    if values.dtype.kind not in "fiu":
        raise InvalidRequest(
            f"{where} must hold only numbers (use the NaN, Infinity and -Infinity tokens for "
            "non-finite values; null, strings and booleans are not numbers)"
        )
    if values.ndim > MAX_DIMS:
        raise InvalidRequest(f"{where} is nested deeper than {MAX_DIMS} levels")
    if values.size > max_elements:
        raise RequestTooLarge(
            f"{where} has {values.size} elements, over the server's max_batch_elements="
            f"{max_elements}"
        )
    if shape is not None:
        need = math.prod(shape)  # a checked shape of python ints
        if values.size != need or (values.ndim > 1 and values.shape != tuple(shape)):
            raise InvalidRequest(
                f"{where} has {values.size} values in shape {list(values.shape)} but shape "
                f"{list(shape)} needs {need}"
            )
        values = values.reshape(shape)
    return dtypes.from_float(values, wire)
