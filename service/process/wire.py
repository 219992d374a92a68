"""The bytes of a snapshot between workers (peer sockets and snapshot files): JSON for the
structure, float64 arrays (``/v1/stats`` windows) as raw little-endian bytes after it.
Nothing is unpickled or evaluated: a reader gets plain lists, dicts, numbers and arrays."""

from __future__ import annotations

import json
import struct

import numpy as np

_HEAD = struct.Struct(">I")
_ARRAY = "__f8_array__"  # {"__f8_array__": byte offset after the JSON, "shape": [...]}


def dumps(obj: object) -> bytes:
    arrays: list[np.ndarray] = []
    offset = 0

    def encode(o: object) -> dict:
        nonlocal offset
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o, dtype="<f8")
            arrays.append(a)
            offset += a.nbytes
            return {_ARRAY: offset - a.nbytes, "shape": list(a.shape)}
        raise TypeError(f"cannot send a {type(o).__name__}")

    head = json.dumps(obj, default=encode, separators=(",", ":")).encode()
    return b"".join([_HEAD.pack(len(head)), head, *(a.tobytes() for a in arrays)])


def loads(data: bytes) -> object:
    (size,) = _HEAD.unpack_from(data)
    body = _HEAD.size + size

    def decode(d: dict) -> object:
        if _ARRAY not in d:
            return d
        shape = tuple(int(n) for n in d["shape"])
        count = int(np.prod(shape)) if shape else 1
        start = body + int(d[_ARRAY])
        if start < body or start + 8 * count > len(data):
            raise ValueError("a snapshot array lies outside the data")
        return np.frombuffer(data, dtype="<f8", count=count, offset=start).reshape(shape)

    return json.loads(data[_HEAD.size:body], object_hook=decode)
