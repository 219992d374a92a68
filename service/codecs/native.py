"""Native wire format (``/v1/activations/{name}``): JSON and raw little-endian bytes.

Torch-free. ``read_*`` and ``write_*`` are the formats; ``NativeJson`` and ``NativeBinary``
are their codecs (``service.codecs.base``). Decoding validates everything a request says
before it is queued.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import numpy as np

from service import dtypes
from service.codecs.base import Encoded, Wire
from service.codecs.fields import SETTING_NAMES, check_shape, parse_shape_text
from service.engine import reports
from service.errors import InvalidRequest, UnsupportedMediaType, echo

if TYPE_CHECKING:
    from service.engine.activations import Activation
    from service.engine.job import Job, JobResult
    from service.engine.jobs import JobFactory

from service.codecs.jsonio import array_from_json, dumps, loads_object

ZERO_COPY_BYTES = 64 * 1024


def parse_query(raw: bytes) -> dict[str, str]:
    """An ASGI ``query_string`` as a dict, the last value of a repeated name winning: the
    same mapping as Starlette's ``request.query_params``. Plain ``a=1&b=2`` strings (the
    usual case) are split directly; anything escaped goes through ``parse_qsl``."""
    text = raw.decode("latin-1")
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    out = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            out[name] = value
    return out

JSON_FIELDS = ("data", "shape", "dtype", "params", "grad_output", *SETTING_NAMES)
QUERY_FIELDS = ("shape", "dtype", "grad_output")


# -- the formats -------------------------------------------------------------------------
def read_json(body: bytes | bytearray, max_elements: int):
    """``{"data", "shape"?, "dtype"?, "params"?, "grad_output"?, <settings>}`` -> (array,
    dtype, settings, params, grad_output or None)."""
    obj = loads_object(body, max_elements)
    unknown = [k for k in obj if k not in JSON_FIELDS]
    if unknown:
        raise InvalidRequest(
            f"unknown field {echo(unknown[0])}; allowed fields: {', '.join(JSON_FIELDS)}"
        )
    if "data" not in obj:
        raise InvalidRequest("missing field 'data' (a number or a nested list of numbers)")
    wire = dtypes.check_name(obj.get("dtype", "float32"), "dtype")
    shape = None
    if obj.get("shape") is not None:
        shape = check_shape(obj["shape"], "shape", max_elements)
    array = array_from_json(obj["data"], shape, wire, "data", max_elements)
    params = obj.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("params must be an object, e.g. {\"negative_slope\": 0.1}")
    settings = {k: obj[k] for k in SETTING_NAMES if obj.get(k) is not None}
    grad = None
    if obj.get("grad_output") is not None:
        grad = array_from_json(obj["grad_output"], array.shape, wire, "grad_output",
                               max_elements)
    return array, wire, settings, params, grad


def write_json(activation: str, array: np.ndarray, dtype: str) -> bytes:
    return dumps({
        "activation": activation,
        "shape": list(array.shape),
        "dtype": dtype,
        "data": dtypes.to_float(array, dtype),
    })


def write_lab_json(job: Job, result: JobResult) -> bytes:
    """The answer of a request that asked for a gradient or a report (docs/lab.md)."""
    out: dict = {"activation": job.activation.name, "shape": list(result.array.shape),
                 "dtype": result.dtype}
    if "value" in job.outputs:
        out["data"] = dtypes.to_float(result.array, result.dtype)
    if result.grad is not None:
        out["grad_dtype"] = result.grad_dtype
        out["grad"] = dtypes.to_float(result.grad, result.grad_dtype)
    if result.reports:
        out["report"] = result.reports
    return dumps(out)


def read_binary(body: bytearray, query: Mapping[str, str], max_elements: int):
    """Raw little-endian bytes; shape, dtype, settings and params in the query string. With
    ``grad_output=true`` the body is the input's bytes, then the upstream gradient's (same
    shape and dtype). -> (array, dtype, settings, params, grad_output or None)."""
    if "shape" not in query:
        raise InvalidRequest(
            "binary requests need ?shape=... (comma-separated, empty for a 0-d scalar)"
        )
    shape = parse_shape_text(query["shape"], "shape", max_elements)
    wire = dtypes.check_name(query.get("dtype", "float32"), "dtype")
    one = math.prod(shape) * dtypes.itemsize(wire)  # python ints: exact
    tensors = 2 if _flag(query.get("grad_output")) else 1
    expected = one * tensors
    if len(body) != expected:
        what = " (input, then grad_output)" if tensors == 2 else ""
        raise InvalidRequest(
            f"body has {len(body)} bytes but {tensors} x shape {list(shape)} of {wire}"
            f"{what} needs {expected}"
        )
    storage = dtypes.STORAGE[wire]
    count = math.prod(shape)
    array = np.frombuffer(body, dtype=storage, count=count).reshape(shape)
    grad = None
    if tensors == 2:
        grad = np.frombuffer(body, dtype=storage, count=count, offset=one).reshape(shape)
    settings = {k: query[k] for k in SETTING_NAMES if k in query}
    params = {k: v for k, v in query.items() if k not in SETTING_NAMES
              and k not in QUERY_FIELDS}
    return array, wire, settings, params, grad


def _flag(raw: str | None) -> bool:
    if raw is None or raw.lower() in ("0", "false", "no", ""):
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    raise InvalidRequest(f"grad_output={echo(raw)}: say true when the body carries the "
                         "upstream gradient after the input, false otherwise")


def write_binary(array: np.ndarray, dtype: str) -> tuple[bytes | memoryview, dict[str, str]]:
    """The raw bytes and the headers. A large C-contiguous array goes out as a zero-copy
    view (a 4 MiB copy costs about 0.4 ms); a small one is copied (cheaper than a view)."""
    headers = {"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": dtype}
    if array.nbytes >= ZERO_COPY_BYTES and array.flags.c_contiguous:
        return memoryview(array.reshape(-1).view(np.uint8)), headers
    return array.tobytes(), headers


def write_lab_binary(job: Job, result: JobResult) -> tuple[list, dict[str, str]]:
    """The parts of a lab answer, in order: the value (if asked), the gradient (if asked),
    and a JSON part for each report carried as one (``profile``); ``X-Outputs``,
    ``X-Output-Dtypes`` and ``X-Output-Bytes`` name them, and every other report travels in
    its header (``X-Report-Numerics``; docs/lab.md, ``service/engine/reports``)."""
    parts: list[tuple[str, str, bytes | memoryview]] = []
    if "value" in job.outputs:
        parts.append(("value", result.dtype, write_binary(result.array, result.dtype)[0]))
    if result.grad is not None:
        parts.append(("grad", result.grad_dtype,
                      write_binary(result.grad, result.grad_dtype)[0]))
    tensors = len(parts)
    in_headers = {}
    for name, value in result.reports.items():
        if reports.REGISTRY[name].binary == "part":
            parts.append((name, "json", dumps(value)))
        else:
            in_headers[reports.header(name)] = dumps(value).decode()
    headers = {
        "X-Shape": ",".join(map(str, result.array.shape)),
        "X-Dtype": parts[0][1] if tensors else result.dtype,
        "X-Outputs": ",".join(p[0] for p in parts),
        "X-Output-Dtypes": ",".join(p[1] for p in parts),
        "X-Output-Bytes": ",".join(str(memoryview(p[2]).nbytes) for p in parts),
        **in_headers,
    }
    return [p[2] for p in parts], headers


# -- the codecs --------------------------------------------------------------------------
class NativeJson:
    api = "native"

    def decode(self, body: bytearray, wire: Wire, activation: Activation,
               jobs: JobFactory) -> tuple[Job, None]:
        array, dtype, settings, params, grad = read_json(body, jobs.settings.max_batch_elements)
        job = jobs.build(activation, array, dtype, settings, params, api=self.api,
                         grad_output=grad)
        if job.report:
            reports.check_wire(job.report, "native-json", "request")
        return job, None

    def encode(self, job: Job, answer: None, result: JobResult) -> Encoded:
        if job.lab:
            return Encoded(write_lab_json(job, result), "application/json")
        return Encoded(write_json(job.activation.name, result.array, result.dtype),
                       "application/json")

    def tensor_at(self, wire: Wire) -> None:
        return None


class NativeBinary:
    api = "native"

    def decode(self, body: bytearray, wire: Wire, activation: Activation,
               jobs: JobFactory) -> tuple[Job, None]:
        array, dtype, settings, params, grad = read_binary(
            body, parse_query(wire.query), jobs.settings.max_batch_elements)
        job = jobs.build(activation, array, dtype, settings, params, api=self.api,
                         grad_output=grad)
        if job.report:
            reports.check_wire(job.report, "native-binary", "request")
        return job, None

    def encode(self, job: Job, answer: None, result: JobResult) -> Encoded:
        if job.lab:
            parts, headers = write_lab_binary(job, result)
            return Encoded(parts, "application/octet-stream", headers)
        payload, headers = write_binary(result.array, result.dtype)
        return Encoded(payload, "application/octet-stream", headers)

    def tensor_at(self, wire: Wire) -> int:
        return 0  # the body is the tensor


class Unsupported:
    """A content type no native codec reads: refused (415) once the request is admitted."""

    api = "native"

    def __init__(self, content_type: str) -> None:
        self.content_type = content_type

    def decode(self, body: bytearray, wire: Wire, activation: Activation,
               jobs: JobFactory) -> tuple[Job, None]:
        raise UnsupportedMediaType(
            f"Content-Type {echo(self.content_type)} is not supported; use application/json "
            "or application/octet-stream"
        )

    def encode(self, job: Job, answer: None, result: JobResult) -> Encoded:
        raise AssertionError("decode always refuses")

    def tensor_at(self, wire: Wire) -> None:
        return None


JSON = NativeJson()
BINARY = NativeBinary()
# a body without a Content-Type is refused: a browser may send that cross-site
BY_CONTENT_TYPE = {"application/json": JSON, "application/octet-stream": BINARY}


def for_content_type(header: str) -> NativeJson | NativeBinary | Unsupported:
    ctype = header.split(";")[0].strip().lower()
    return BY_CONTENT_TYPE.get(ctype) or Unsupported(ctype)
