"""Wire dtypes: names, numpy storage and sizes. Torch-free.

bfloat16 has no numpy dtype: its storage is ``uint16`` holding the upper 16 bits of a
float32, which is exactly torch's bfloat16 bit pattern.
"""

from __future__ import annotations

import sys

import numpy as np

from service.errors import InvalidRequest, echo

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise RuntimeError("actserve assumes a little-endian host: the wire format is little-endian")

STORAGE: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
NAMES = tuple(STORAGE)

# KServe v2 datatype names <-> ours.
V2_TO_NAME = {"FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}
NAME_TO_V2 = {v: k for k, v in V2_TO_NAME.items()}


def check_name(name: object, field: str) -> str:
    if not isinstance(name, str) or name not in STORAGE:
        raise InvalidRequest(f"{field}={echo(name)} is not supported; use one of {', '.join(NAMES)}")
    return name


def itemsize(name: str) -> int:
    return STORAGE[name].itemsize


def to_float(array: np.ndarray, name: str) -> np.ndarray:
    """Values of a wire array as a numpy float array (float32 for bfloat16), for JSON."""
    if name == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def from_float(values: np.ndarray, name: str) -> np.ndarray:
    """Numeric values -> wire storage of ``name`` (round to nearest even for bfloat16)."""
    with np.errstate(over="ignore", invalid="ignore"):  # out of range -> inf, as torch does
        if name != "bfloat16":
            return np.asarray(values, dtype=STORAGE[name], order="C")  # keeps 0-d
        f32 = np.asarray(values, dtype=np.float32, order="C")
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(f32)
    out = np.asarray(rounded, dtype=np.uint16)  # an array even for 0-d input
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out
