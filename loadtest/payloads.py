"""Deterministic request payloads for every protocol, and the check of every answer.

Used by the Locust file and by the benchmark sweep. A ``Case`` says what is asked (activation,
params, compute dtype, amp, in-place, element count, protocol); ``values(case, seed)`` makes
the same float32 input for the same seed on every machine; ``build`` turns it into the
request's path, body and headers; ``parse`` reads the answer back into wire storage, and
``expected`` is the bit-exact reference (``service.engine.reference.reference`` on this request
alone, on CPU, with the server's intra-op thread count), so any difference is a failure.

Torch is imported only by ``expected``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import orjson

PROTOCOLS = ("native-binary", "native-json", "v2-binary", "v2-json")
V2_TYPES = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64"}
V2_NAMES = {v: k for k, v in V2_TYPES.items()}
STORAGE = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8"}
INFER_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Case:
    activation: str = "relu"
    size: int = 1024
    protocol: str = "native-binary"
    params: tuple = ()  # ((name, value), ...)
    compute_dtype: str | None = None
    amp: bool = False
    inplace: bool = False

    @property
    def label(self) -> str:
        mode = self.mode_label
        return f"{self.protocol} {self.activation} {self.size}" + (f" {mode}" if mode else "")

    @property
    def mode_label(self) -> str:
        parts = []
        if self.compute_dtype:
            parts.append(self.compute_dtype)
        if self.amp:
            parts.append("amp")
        if self.inplace:
            parts.append("inplace")
        return "+".join(parts)

    def settings(self) -> dict:
        out: dict = {}
        if self.compute_dtype:
            out["compute_dtype"] = self.compute_dtype
        if self.amp:
            out["amp"] = True
        if self.inplace:
            out["inplace"] = True
        return out


@dataclass
class Request:
    path: str
    body: bytes
    headers: dict = field(default_factory=dict)


def values(case: Case, seed: int) -> np.ndarray:
    """``case.size`` float32 values in about [-6, 6], the same for the same seed everywhere."""
    rng = np.random.default_rng([seed, case.size])
    return (rng.standard_normal(case.size) * 2.0).astype(np.float32)


def _query_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def build(case: Case, x: np.ndarray) -> Request:
    """The request for ``case`` carrying the float32 input ``x``."""
    params = dict(case.params)
    settings = case.settings()
    if case.protocol == "native-binary":
        query = {"shape": str(x.size), "dtype": "float32", **settings, **params}
        qs = "&".join(f"{k}={_query_value(v)}" for k, v in query.items())
        return Request(f"/v1/activations/{case.activation}?{qs}", x.astype("<f4").tobytes(),
                       {"Content-Type": "application/octet-stream"})
    if case.protocol == "native-json":
        obj = {"data": x, "dtype": "float32", **settings}
        if params:
            obj["params"] = params
        return Request(f"/v1/activations/{case.activation}",
                       orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY),
                       {"Content-Type": "application/json"})
    if case.protocol in ("v2-binary", "v2-json"):
        binary = case.protocol == "v2-binary"
        tensor: dict = {"name": "input", "shape": [int(x.size)], "datatype": "FP32"}
        if binary:
            raw = x.astype("<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
        else:
            tensor["data"] = x
        obj = {"inputs": [tensor],
               "outputs": [{"name": "output", "parameters": {"binary_data": binary}}]}
        if settings or params:
            obj["parameters"] = {**settings, **params}
        head = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
        path = f"/v2/models/{case.activation}/infer"
        if binary:
            return Request(path, head + raw, {"Content-Type": "application/octet-stream",
                                              INFER_HEADER: str(len(head))})
        return Request(path, head, {"Content-Type": "application/json"})
    raise ValueError(f"unknown protocol {case.protocol!r}; use one of {', '.join(PROTOCOLS)}")


def _from_json_values(data, dtype: str) -> np.ndarray:
    from service import dtypes  # torch-free

    return dtypes.from_float(np.asarray(data, dtype=np.float64), dtype)


def _loads(body: bytes):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # NaN / Infinity tokens
        return json.loads(body)


def parse(case: Case, headers, body: bytes) -> tuple[np.ndarray, str]:
    """The answer's output as (wire storage, dtype name). ``headers``: any case-insensitive
    mapping. Raises ``ValueError`` when the answer is not a well-formed success."""
    if case.protocol == "native-binary":
        dtype = headers.get("x-dtype") or headers.get("X-Dtype")
        if dtype not in STORAGE:
            raise ValueError(f"answer has no usable X-Dtype header: {dtype!r}")
        return np.frombuffer(body, dtype=STORAGE[dtype]), dtype
    if case.protocol == "native-json":
        obj = _loads(body)
        return _from_json_values(obj["data"], obj["dtype"]).reshape(-1), obj["dtype"]
    if case.protocol in ("v2-binary", "v2-json"):
        raw_len = headers.get("inference-header-content-length") or headers.get(INFER_HEADER)
        head_len = int(raw_len) if raw_len is not None else len(body)
        obj = _loads(body[:head_len])
        out = obj["outputs"][0]
        dtype = V2_NAMES[out["datatype"]]
        if "data" in out:
            return _from_json_values(out["data"], dtype).reshape(-1), dtype
        return np.frombuffer(body[head_len:], dtype=STORAGE[dtype]), dtype
    raise ValueError(f"unknown protocol {case.protocol!r}")


def expected(case: Case, x: np.ndarray, torch_threads: int = 1) -> tuple[np.ndarray, str]:
    """The reference answer: the activation applied to this request alone, on CPU."""
    import torch

    from service.engine.activations import Registry
    from service.engine.job import Mode
    from service.engine.reference import reference

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    act = _registry(Registry).get(case.activation)
    out, dtype = reference(act, act.parse_params(dict(case.params)), x, "float32",
                           Mode(case.compute_dtype, case.amp, None, case.inplace))
    return out.reshape(-1), dtype


_REGISTRY: list = []


def _registry(factory):
    if not _REGISTRY:
        _REGISTRY.append(factory())
    return _REGISTRY[0]


def mismatch(case: Case, got: tuple[np.ndarray, str], want: tuple[np.ndarray, str]) -> str | None:
    """Why ``got`` differs from ``want`` (bit for bit), or None when they are the same."""
    (g, gd), (w, wd) = got, want
    if gd != wd:
        return f"{case.label}: dtype {gd} but the reference gives {wd}"
    if g.shape != w.shape:
        return f"{case.label}: {g.size} values but the reference has {w.size}"
    if g.tobytes() != w.tobytes():
        bits = f"<u{g.itemsize}"
        diff = np.flatnonzero(g.view(bits) != w.view(bits))
        return (f"{case.label}: {diff.size} of {g.size} values differ from the reference "
                f"(first at index {int(diff[0])})")
    return None


def close(got: tuple[np.ndarray, str], want: tuple[np.ndarray, str]) -> bool:
    """Whether two answers of one dtype agree to that dtype's precision (another device)."""
    from service import dtypes

    (g, dtype), (w, _) = got, want
    if g.shape != w.shape:
        return False
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-5)
    return bool(np.allclose(dtypes.to_float(g, dtype).astype(np.float64),
                            dtypes.to_float(w, dtype).astype(np.float64),
                            rtol=tol, atol=tol, equal_nan=True))


# -- helpers shared with the Locust file (kept here: importing locust patches the stdlib) --
def weighted(spec: str) -> tuple[list[str], list[float]]:
    """``a:3,b:1`` -> (["a", "b"], [3.0, 1.0]); a missing weight is 1."""
    names, weights = [], []
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, w = part.strip().partition(":")
        names.append(name.strip())
        weights.append(float(w) if w else 1.0)
    if not names or not any(weights) or min(weights) < 0:
        raise ValueError(f"{spec!r} is not a mix; write name:weight,... with weights >= 0")
    return names, weights


def server_timing(header: str | None) -> dict[str, float]:
    """``decode;dur=0.1, queue;dur=2`` -> {"decode": 0.1, "queue": 2.0} (milliseconds)."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        for attr in rest.split(";"):
            k, _, v = attr.strip().partition("=")
            if k == "dur":
                try:
                    out[name.strip()] = float(v)
                except ValueError:
                    pass
    return out
