"""User inputs <-> wire arrays. I/O-free; torch and ml_dtypes are optional.

A wire array is little-endian, C-contiguous numpy storage plus a dtype name. bfloat16 has no
numpy dtype of its own: its storage is ``uint16`` holding the upper 16 bits of a float32,
which is torch's bfloat16 bit pattern and the v2 ``BF16`` wire format.

Inputs come as numpy arrays (float16, float32, float64, or ml_dtypes' bfloat16), torch
tensors (when torch is installed; it is never imported here unless the caller already did),
nested lists or plain numbers. Results go back as the same kind.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._exceptions import InvalidInputError

STORAGE: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
NAMES = tuple(STORAGE)
V2_TO_NAME = {"FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}
NAME_TO_V2 = {v: k for k, v in V2_TO_NAME.items()}
MAX_DIMS = 32
_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
            "double": "float64", "fp64": "float64", "bf16": "bfloat16"}
_HINT = "cast it first, e.g. x.astype(np.float32) or t.float()"


@dataclass(frozen=True)
class Wire:
    """One tensor as it travels: storage (see the module docstring) and its dtype name."""

    storage: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.storage.shape)

    @property
    def nbytes(self) -> int:
        return int(self.storage.nbytes)


@dataclass(frozen=True)
class Kind:
    """What the caller passed, so the result can be returned as the same kind."""

    name: str  # "numpy" | "numpy_scalar" | "torch" | "list" | "number"
    device: Any = None  # torch device of the input


def dtype_name(dtype: object, field: str = "dtype") -> str:
    """A dtype given as a name, numpy dtype, numpy type, ml_dtypes type or torch dtype ->
    one of ``NAMES``."""
    if isinstance(dtype, str):
        name = dtype.strip()
        name = V2_TO_NAME.get(name.upper(), name.lower())
        name = _ALIASES.get(name, name).removeprefix("torch.")
    elif type(dtype).__module__ == "torch":  # a torch.dtype, without importing torch
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except TypeError:
            name = repr(dtype)
    if name not in STORAGE:
        raise InvalidInputError(
            f"{field}={dtype!r} is not supported; use one of {', '.join(NAMES)}"
        )
    return name


def _torch_module():
    """torch if the caller has imported it already; None otherwise (never imports it)."""
    return sys.modules.get("torch")


def _is_tensor(x: object) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def to_wire(x: object, what: str = "input") -> tuple[Wire, Kind]:
    """Validate ``x`` and turn it into a wire array; say what kind it was."""
    if _is_tensor(x):
        return _tensor_to_wire(x, what)
    if isinstance(x, np.ndarray):
        return Wire(_numpy_storage(x, what), _numpy_dtype(x.dtype, what)), Kind("numpy")
    if isinstance(x, np.generic):
        arr = np.asarray(x)
        return Wire(_numpy_storage(arr, what), _numpy_dtype(arr.dtype, what)), Kind("numpy_scalar")
    if isinstance(x, bool) or not isinstance(x, (int, float, list, tuple)):
        raise InvalidInputError(
            f"{what} must be a numpy array, a torch tensor, a nested list or a number; "
            f"got {type(x).__name__}"
        )
    kind = Kind("number" if isinstance(x, (int, float)) else "list")
    try:
        values = np.array(x)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInputError(f"{what} must be a rectangular (non-ragged) nested list") from None
    if values.dtype.kind not in "fiu":
        raise InvalidInputError(
            f"{what} must hold only numbers (float('nan') and float('inf') are fine); "
            f"got values of type {values.dtype}"
        )
    _check_dims(values, what)
    return Wire(np.asarray(values, dtype=STORAGE["float32"], order="C"), "float32"), kind


def _numpy_dtype(dtype: np.dtype, what: str) -> str:
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        return "bfloat16"
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dtype.itemsize]
    raise InvalidInputError(
        f"{what} has dtype {dtype}; actserve computes in {', '.join(NAMES)}: {_HINT}"
    )


def _numpy_storage(arr: np.ndarray, what: str) -> np.ndarray:
    _check_dims(arr, what)
    name = _numpy_dtype(arr.dtype, what)
    if name == "bfloat16":
        return np.asarray(arr, order="C").view(STORAGE["bfloat16"])
    return np.asarray(arr, dtype=STORAGE[name], order="C")  # also fixes big-endian input


def _check_dims(arr: np.ndarray, what: str) -> None:
    if arr.ndim > MAX_DIMS:
        raise InvalidInputError(f"{what} has {arr.ndim} dimensions; at most {MAX_DIMS} are allowed")


def _tensor_to_wire(t, what: str) -> tuple[Wire, Kind]:
    import torch

    if t.layout != torch.strided:
        raise InvalidInputError(f"{what} is a {t.layout} tensor; send a dense (strided) tensor")
    name = str(t.dtype).removeprefix("torch.")
    if name not in STORAGE:
        raise InvalidInputError(f"{what} has dtype {t.dtype}; actserve computes in "
                                f"{', '.join(NAMES)}: {_HINT}")
    if t.ndim > MAX_DIMS:
        raise InvalidInputError(f"{what} has {t.ndim} dimensions; at most {MAX_DIMS} are allowed")
    device = t.device
    host = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        storage = host.view(torch.int16).numpy().view(STORAGE["bfloat16"])
    else:
        storage = host.numpy()
    return Wire(storage, name), Kind("torch", device)


def storage_from_buffer(buf: bytes | memoryview, dtype: str, shape: list[int] | tuple[int, ...],
                        what: str = "output") -> np.ndarray:
    """Raw little-endian bytes -> a read-only view of them as storage of ``dtype`` and
    ``shape`` (possibly unaligned: ``from_wire`` copies it into its final home)."""
    if dtype not in STORAGE:
        raise ValueError(f"{what}: unknown dtype {dtype!r}")
    need = int(np.prod(shape, dtype=np.int64)) * STORAGE[dtype].itemsize
    if len(buf) != need:
        raise ValueError(f"{what}: {len(buf)} bytes for shape {list(shape)} of {dtype}; need {need}")
    return np.frombuffer(buf, dtype=STORAGE[dtype]).reshape(shape)


def storage_from_values(values: object, dtype: str, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """JSON numbers (nested or flat) -> storage of ``dtype`` and ``shape``; exact for values
    that came from that dtype."""
    f64 = np.asarray(values, dtype=np.float64).reshape(shape)
    if dtype != "bfloat16":
        return np.asarray(f64, dtype=STORAGE[dtype], order="C")
    f32 = np.asarray(f64, dtype=np.float32, order="C")
    return np.asarray(f32.view(np.uint32) >> 16, dtype=STORAGE["bfloat16"])  # 0-d stays an array


def widen_bfloat16(storage: np.ndarray) -> np.ndarray:
    """bfloat16 storage -> float32 with exactly the same values."""
    return np.asarray(storage.astype(np.uint32) << 16, dtype=np.uint32).view(np.float32)


_BF16: list = []


def numpy_bfloat16() -> np.dtype | None:
    """ml_dtypes' bfloat16 dtype when ml_dtypes is installed, else None."""
    if not _BF16:
        try:
            import ml_dtypes
        except ImportError:
            _BF16.append(None)
        else:
            _BF16.append(np.dtype(ml_dtypes.bfloat16))
    return _BF16[0]


def from_wire(storage: np.ndarray, dtype: str, kind: Kind):
    """Storage of a result -> the kind the caller passed.

    numpy bfloat16 results use ml_dtypes' dtype when it is installed and are otherwise
    widened to float32 (the same values exactly); lists and numbers hold Python floats.
    """
    if kind.name == "torch":
        import torch

        # Copy into torch's own (64-byte aligned) memory: a tensor that is a view of an
        # arbitrary offset in the response would be valid, but the BLAS kernels of a
        # following layer may take another path for unaligned data and round differently.
        t = torch.empty(storage.shape, dtype=getattr(torch, dtype))
        dst = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
        np.copyto(dst, storage, casting="no")
        if kind.device is not None and kind.device.type != "cpu":
            t = t.to(kind.device)
        return t
    if not (storage.flags.writeable and storage.flags.aligned):
        storage = storage.copy()  # an ordinary, aligned, writable array of its own
    if dtype == "bfloat16":
        bf16 = numpy_bfloat16()
        values = widen_bfloat16(storage) if bf16 is None or kind.name in ("list", "number") \
            else storage.view(bf16)
    else:
        values = storage
    if kind.name == "numpy":
        return values
    if kind.name == "numpy_scalar":
        return values[()]
    if kind.name == "number":
        return float(values.reshape(-1)[0]) if values.size == 1 else values.tolist()
    return values.tolist()
