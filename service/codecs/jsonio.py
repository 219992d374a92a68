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
from service.codecs import jsonbound
from service.codecs.fields import MAX_DIMS
from service.errors import InvalidRequest, RequestTooLarge, echo
from service.validation import SURROGATE_ESCAPE, refuse_lone_surrogates


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
    if SURROGATE_ESCAPE.search(body):  # only such a body can hold a lone surrogate
        refuse_lone_surrogates(obj)
    return obj


SLICE_ELEMENTS = 32768  # arrays this large are written a slice at a time


def dumps(obj: dict) -> bytes:
    """Serialise a response whose numeric payload sits in numpy arrays under any key. Large
    arrays are written a slice at a time (each step a few milliseconds, so a worker thread
    running this gives the interpreter back to the event loop between slices)."""
    large = {k: v for k, v in obj.items()
             if isinstance(v, np.ndarray) and v.ndim > 0 and v.size >= SLICE_ELEMENTS}
    nested = [o for o in obj.get("outputs", ()) if isinstance(o, dict)]
    if not large and not any(isinstance(o.get("data"), np.ndarray) and o["data"].ndim > 0
                             and o["data"].size >= SLICE_ELEMENTS for o in nested):
        return _dumps_whole(obj)
    marks: dict[bytes, np.ndarray] = {}

    def mark(array: np.ndarray) -> str:
        token = f"\x00array-{len(marks)}"
        marks[orjson.dumps(token)] = array
        return token

    skeleton = {k: (mark(v) if k in large else v) for k, v in obj.items()}
    if nested:
        skeleton["outputs"] = [
            {**o, "data": mark(o["data"])} if isinstance(o.get("data"), np.ndarray)
            and o["data"].ndim > 0 and o["data"].size >= SLICE_ELEMENTS else o
            for o in nested]
    text = _dumps_whole(skeleton)
    for token, array in marks.items():
        head, _, tail = text.partition(token)
        text = head + _dumps_array(array) + tail
    return text


def _dumps_array(array: np.ndarray) -> bytes:
    """A JSON array of ``array`` (ndim >= 1), written slice by slice along its first axis."""
    rows = max(1, SLICE_ELEMENTS // max(1, array.size // max(1, array.shape[0])))
    parts = []
    for i in range(0, array.shape[0], rows):
        piece = array[i:i + rows]
        if piece.size and bool(np.isfinite(piece).all()):
            text = orjson.dumps(piece, option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            text = json.dumps(piece.tolist(), allow_nan=True, separators=(",", ":")).encode()
        parts.append(text[1:-1])
    return b"[" + b",".join(p for p in parts if p) + b"]"


def _dumps_whole(obj: dict) -> bytes:
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
