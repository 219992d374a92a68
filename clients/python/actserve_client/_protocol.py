"""The four wire formats an activation request can travel in. I/O-free: each builds an
``HttpRequest`` from a wire array and parses a successful answer back into one.

* ``v2``           KServe v2 / Open Inference Protocol with the binary tensor extension
                   (default): JSON header, then the raw little-endian bytes.
* ``v2-json``      KServe v2 with the tensor as a flat JSON list (float32 and float64 only:
                   FP16 and BF16 travel as binary, as in Triton).
* ``native``       ``POST /v1/activations/{name}`` with raw bytes; shape, dtype and
                   settings in the query string.
* ``native-json``  ``POST /v1/activations/{name}`` with a JSON body.

Non-finite values: JSON bodies carry the ``NaN``, ``Infinity`` and ``-Infinity`` tokens (as
Python's json module and the server do); binary bodies carry them natively.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ._arrays import NAME_TO_V2, V2_TO_NAME, Wire, storage_from_buffer, storage_from_values, widen_bfloat16
from ._exceptions import InvalidInputError, MalformedResponseError

PROTOCOLS = ("v2", "v2-json", "native", "native-json")
V2_INPUT_NAME = "input"
V2_HEADER_LENGTH = "Inference-Header-Content-Length"
# Per-request settings (not activation params); everything else in **params is a param.
SETTING_NAMES = ("compute_dtype", "amp", "amp_dtype", "inplace", "timeout", "priority",
                 "expr")
_RESERVED = frozenset({"shape", "dtype", "data", "params", "binary_data_output"})


@dataclass(frozen=True)
class HttpRequest:
    """Everything needed to send one request; ``timeout`` overrides the client's (seconds)."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    params: dict[str, str] | None = None
    timeout: float | None = None


def activation_path(prefix: str, name: str, suffix: str = "") -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"activation name must be a non-empty string, got {name!r}")
    return f"{prefix}{quote(name, safe='')}{suffix}"


def check_params(params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        if key in _RESERVED:
            raise InvalidInputError(f"{key!r} is reserved by the wire format; it cannot be a parameter")
        if not isinstance(value, (bool, int, float, str)):
            raise InvalidInputError(
                f"parameter {key}={value!r} must be a number, a string or a boolean"
            )


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()


def _loads(content: bytes | bytearray | memoryview, what: str) -> dict:
    try:
        obj = json.loads(bytes(content))
    except ValueError as exc:
        raise MalformedResponseError(f"{what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise MalformedResponseError(f"{what} is not a JSON object")
    return obj


def _json_values(wire: Wire) -> list:
    """Flat (row-major) values; with the shape beside them this also carries empty
    dimensions that nested lists cannot express ([[], []] for shape (2, 0, 3))."""
    values = widen_bfloat16(wire.storage) if wire.dtype == "bfloat16" else wire.storage
    return values.reshape(-1).tolist()


# -- KServe v2 ---------------------------------------------------------------------------
def _v2_parameters(settings: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = dict(params)
    for key, value in settings.items():
        if key == "timeout":
            out["timeout"] = max(1, round(value * 1_000_000))  # v2: microseconds
        else:
            out[key] = value
    return out


def build_v2(name: str, wire: Wire, settings: Mapping[str, Any], params: Mapping[str, Any],
             request_id: str, *, binary: bool = True) -> HttpRequest:
    datatype = NAME_TO_V2[wire.dtype]
    tensor: dict[str, Any] = {"name": V2_INPUT_NAME, "shape": list(wire.shape), "datatype": datatype}
    parameters = _v2_parameters(settings, params)
    path = activation_path("/v2/models/", name, "/infer")
    if binary:
        tensor["parameters"] = {"binary_data_size": wire.nbytes}
        parameters["binary_data_output"] = True
        header = _dumps({"id": request_id, "inputs": [tensor], "parameters": parameters})
        return HttpRequest("POST", path, {
            "Content-Type": "application/octet-stream",
            V2_HEADER_LENGTH: str(len(header)),
        }, header + wire.storage.tobytes())
    if wire.dtype in ("float16", "bfloat16"):
        raise InvalidInputError(
            f"{datatype} travels only as binary in the v2 protocol; use protocol='v2' "
            "(the default) or 'native-json', or cast to float32"
        )
    tensor["data"] = wire.storage.reshape(-1).tolist()
    body = _dumps({"id": request_id, "inputs": [tensor], "parameters": parameters})
    return HttpRequest("POST", path, {"Content-Type": "application/json"}, body)


def parse_v2(headers: Mapping[str, str], content: bytes) -> Wire:
    buf = memoryview(content)
    declared = headers.get(V2_HEADER_LENGTH.lower())
    try:
        if declared is None:
            header_len = len(buf)
        else:
            header_len = int(declared)
            if not 0 < header_len <= len(buf):
                raise ValueError(f"{V2_HEADER_LENGTH} {header_len} is outside the body "
                                 f"of {len(buf)} bytes")
        obj = _loads(buf[:header_len], "v2 response header")
        outputs = obj.get("outputs")
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
            raise ValueError("v2 response has no outputs")
        out = outputs[0]
        dtype = V2_TO_NAME.get(out.get("datatype", ""))
        shape = out.get("shape")
        if dtype is None:
            raise ValueError(f"v2 output datatype {out.get('datatype')!r} is not one of "
                             f"{', '.join(V2_TO_NAME)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"v2 output shape {shape!r} is not a list of sizes")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            if "data" not in out:
                raise ValueError("v2 output has neither data nor binary_data_size")
            return Wire(storage_from_values(out["data"], dtype, shape), dtype)
        if not isinstance(size, int) or header_len + size != len(buf):
            raise ValueError(f"v2 output binary_data_size {size!r} does not match the "
                             f"{len(buf) - header_len} bytes after the header")
        return Wire(storage_from_buffer(buf[header_len:], dtype, shape), dtype)
    except MalformedResponseError:
        raise
    except (ValueError, TypeError) as exc:
        raise MalformedResponseError(str(exc)) from None


def build_v2_shm(name: str, wire: Wire, settings: Mapping[str, Any], params: Mapping[str, Any],
                 request_id: str, region: str, out_offset: int, out_bytes: int) -> HttpRequest:
    """A v2 request whose input sits at the start of the registered shared-memory ``region``
    and whose output goes into the same region at ``out_offset`` (at most ``out_bytes``)."""
    tensor = {"name": V2_INPUT_NAME, "shape": list(wire.shape), "datatype": NAME_TO_V2[wire.dtype],
              "parameters": {"shared_memory_region": region,
                             "shared_memory_byte_size": wire.nbytes}}
    output = {"name": "output", "parameters": {"shared_memory_region": region,
                                               "shared_memory_byte_size": out_bytes,
                                               "shared_memory_offset": out_offset}}
    body = _dumps({"id": request_id, "inputs": [tensor], "outputs": [output],
                   "parameters": _v2_parameters(settings, params)})
    return HttpRequest("POST", activation_path("/v2/models/", name, "/infer"),
                       {"Content-Type": "application/json"}, body)


def parse_v2_shm(content: bytes, buf: memoryview, out_offset: int) -> Wire:
    """The answer to ``build_v2_shm``: the output copied out of the region."""
    try:
        obj = _loads(content, "v2 response")
        out = (obj.get("outputs") or [None])[0]
        if not isinstance(out, dict):
            raise ValueError("v2 response has no outputs")
        dtype, shape = V2_TO_NAME.get(out.get("datatype", "")), out.get("shape")
        size = (out.get("parameters") or {}).get("shared_memory_byte_size")
        if dtype is None or not isinstance(shape, list) or not isinstance(size, int):
            raise ValueError(f"v2 shared-memory output {out!r} lacks datatype, shape or size")
        view = storage_from_buffer(buf[out_offset:out_offset + size], dtype, shape)
        return Wire(view.copy(), dtype)  # the region is reused by the next call
    except (ValueError, TypeError) as exc:
        raise MalformedResponseError(str(exc)) from None


# -- native --------------------------------------------------------------------------------
def build_native(name: str, wire: Wire, settings: Mapping[str, Any], params: Mapping[str, Any],
                 request_id: str, *, binary: bool = True) -> HttpRequest:
    path = activation_path("/v1/activations/", name)
    if binary:
        query = {"shape": ",".join(str(d) for d in wire.shape), "dtype": wire.dtype}
        query.update({k: _query_value(v) for k, v in settings.items()})
        query.update({k: _query_value(v) for k, v in params.items()})
        return HttpRequest("POST", path, {"Content-Type": "application/octet-stream"},
                           wire.storage.tobytes(), query)
    body = {"data": _json_values(wire), "shape": list(wire.shape), "dtype": wire.dtype,
            "params": dict(params), **settings}
    return HttpRequest("POST", path, {"Content-Type": "application/json"}, _dumps(body))


def parse_native(headers: Mapping[str, str], content: bytes) -> Wire:
    try:
        if headers.get("content-type", "").startswith("application/json"):
            obj = _loads(content, "native response")
            dtype, shape = obj.get("dtype"), obj.get("shape")
            if dtype not in NAME_TO_V2 or not isinstance(shape, list):
                raise ValueError(f"native response has dtype {dtype!r} and shape {shape!r}")
            return Wire(storage_from_values(obj.get("data"), dtype, shape), dtype)
        dtype = headers.get("x-dtype")
        text = headers.get("x-shape")
        if dtype not in NAME_TO_V2 or text is None:
            raise ValueError("native binary response lacks X-Dtype or X-Shape")
        shape = [int(p) for p in text.split(",")] if text.strip() else []
        return Wire(storage_from_buffer(content, dtype, shape), dtype)
    except (ValueError, TypeError) as exc:
        raise MalformedResponseError(str(exc)) from None


# -- the lab: gradients and reports (native binary) -------------------------------------------
LAB_OUTPUTS = ("value", "grad")
LAB_REPORTS = ("numerics", "profile")


def lab_names(raw: Any, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [raw] if isinstance(raw, str) else list(raw)
    for item in items:
        if item not in allowed:
            raise InvalidInputError(f"{what} must name some of {', '.join(allowed)}; "
                                    f"got {item!r}")
    return [n for n in allowed if n in items]


def build_native_lab(name: str, wire: Wire, settings: Mapping[str, Any],
                     params: Mapping[str, Any], outputs: list[str], grad: Wire | None,
                     report: list[str]) -> HttpRequest:
    """A native binary request for a gradient and/or reports: the input's bytes, then the
    upstream gradient's when there is one."""
    request = build_native(name, wire, {**settings, "outputs": ",".join(outputs),
                                        **({"report": ",".join(report)} if report else {})},
                           params, "", binary=True)
    content = request.content
    if grad is not None:
        request.params["grad_output"] = "true"
        content += grad.storage.tobytes()
    return HttpRequest(request.method, request.path, request.headers, content, request.params)


def parse_native_lab(headers: Mapping[str, str], content: bytes) -> dict[str, Any]:
    """A native binary lab answer -> {"value"?: Wire, "grad"?: Wire, "report": {...}}."""
    try:
        names = headers["x-outputs"].split(",")
        kinds = headers["x-output-dtypes"].split(",")
        sizes = [int(n) for n in headers["x-output-bytes"].split(",")]
        text = headers.get("x-shape", "")
        shape = [int(p) for p in text.split(",")] if text.strip() else []
        if len(names) != len(kinds) or len(names) != len(sizes) or sum(sizes) != len(content):
            raise ValueError("X-Outputs, X-Output-Dtypes and X-Output-Bytes do not match "
                             "the body")
        out: dict[str, Any] = {"report": {}}
        if "x-report-numerics" in headers:
            out["report"]["numerics"] = json.loads(headers["x-report-numerics"])
        at = 0
        for part, kind, size in zip(names, kinds, sizes, strict=True):
            raw = content[at:at + size]
            at += size
            if kind == "json":
                out["report"][part] = _loads(raw, f"the {part} report")
            else:
                out[part] = Wire(storage_from_buffer(raw, kind, shape), kind)
        return out
    except (KeyError, ValueError, TypeError) as exc:
        raise MalformedResponseError(f"unreadable gradient/report answer: {exc}") from None


def build(protocol: str, name: str, wire: Wire, settings: Mapping[str, Any],
          params: Mapping[str, Any], request_id: str) -> HttpRequest:
    if protocol == "v2":
        return build_v2(name, wire, settings, params, request_id, binary=True)
    if protocol == "v2-json":
        return build_v2(name, wire, settings, params, request_id, binary=False)
    if protocol == "native":
        return build_native(name, wire, settings, params, request_id, binary=True)
    if protocol == "native-json":
        return build_native(name, wire, settings, params, request_id, binary=False)
    raise InvalidInputError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")


def parse(protocol: str, headers: Mapping[str, str], content: bytes) -> Wire:
    if protocol.startswith("v2"):
        return parse_v2(headers, content)
    return parse_native(headers, content)


def split_settings(options: Mapping[str, Any]) -> tuple[dict, dict]:
    """``**params`` of ``activate`` -> (settings, activation params)."""
    settings = {k: v for k, v in options.items() if k in SETTING_NAMES}
    params = {k: v for k, v in options.items() if k not in SETTING_NAMES}
    check_params(params)
    return settings, params


def error_message(content: bytes, fallback: str) -> tuple[str, str | None, object]:
    """An error body (native ``{"error": {"type", "message"}}``, v2 ``{"error": "msg"}``, or
    anything else) -> (message, error type, decoded body)."""
    try:
        body: object = json.loads(content) if content else None
    except ValueError:
        text = content[:500].decode("utf-8", "replace").strip()
        return text or fallback, None, text
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        if isinstance(err, dict):
            return str(err.get("message") or fallback), err.get("type"), body
        return str(err), None, body
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), None, body
    return fallback, None, body

