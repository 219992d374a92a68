"""The I/O-free core that ``Client`` and ``AsyncClient`` share.

It builds requests, parses answers, turns error statuses and transport failures into the
client's exceptions, and decides about retries. It never sends, sleeps or reads a clock:
the two shells (``_sync.py``, ``_async.py``) do only that, in a loop of the form::

    retries = 0
    while True:
        try:
            response = send(call.request)
        except httpx.RequestError as exc:
            outcome = core.on_transport_error(call, retries, exc)
        else:
            outcome = core.on_response(call, retries, status, headers, body)
        if outcome.retry_in is None:
            return outcome.unwrap()          # the value, or raise the error
        sleep(outcome.retry_in); retries += 1
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import _protocol, _shm
from ._arrays import STORAGE, Kind, dtype_name, from_wire, to_wire
from ._exceptions import (
    ActserveError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidInputError,
    MalformedResponseError,
    OverloadedError,
    error_class,
)
from ._protocol import PROTOCOLS, HttpRequest
from ._retry import DEFAULT_MAX_RETRIES, RetryPolicy, parse_retry_after, response_date
from ._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_CONCURRENCY = 8
# A call's own timeout is also its server-side deadline; the HTTP wait is a little longer so
# that the server's 504 arrives as DeadlineExceededError rather than as a client timeout.
DEADLINE_GRACE_S = 1.0


@dataclass(frozen=True)
class ActivationInfo:
    """One entry of the server's catalogue."""

    name: str
    formula: str
    params: tuple[dict, ...]  # each: name, type, default, and min/max or choices
    inplace: bool  # has an in-place form
    torch: str = ""  # the torch function it matches
    custom: bool = False  # registered at run time (POST /v1/activations)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p["name"] for p in self.params)


@dataclass
class Call:
    """One logical request: what to send, how to read a success, whether to retry."""

    request: HttpRequest
    parse: Callable[[Mapping[str, str], bytes], Any]
    request_id: str
    retry: bool = True
    probe: bool = False  # health/readiness: any failure reads as False, never raises


@dataclass
class Outcome:
    value: Any = None
    error: ActserveError | None = None
    cause: BaseException | None = field(default=None, repr=False)
    retry_in: float | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error from self.cause
        return self.value


@dataclass(frozen=True)
class Answer:
    """What ``activate`` returns when asked for a gradient or a report: ``value`` and
    ``grad`` (each the same kind as the input, None when not asked for) and ``report``
    (``{"numerics": {...}, "profile": {...}}``, the ones asked for)."""

    value: Any = None
    grad: Any = None
    report: dict = field(default_factory=dict)


def _info(a: Mapping[str, Any]) -> ActivationInfo:
    return ActivationInfo(a["name"], a.get("formula", ""), tuple(a.get("params", ())),
                          bool(a.get("inplace")), a.get("torch", ""), bool(a.get("custom")))


def _check_seconds(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class ClientCore:
    """Configuration and every decision of a client; no I/O."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, api_key: str | None = None,
                 protocol: str = "v2", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 retry_policy: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, shared_memory: str = "off",
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD,
                 stamp_start: bool = False) -> None:
        parts = urlsplit(base_url)
        if shared_memory not in _shm.MODES:
            raise ValueError(f"shared_memory={shared_memory!r} is not one of "
                             f"{', '.join(_shm.MODES)}")
        self.shared_memory = shared_memory
        self.shared_memory_threshold = shared_memory_threshold
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must look like http://host:port, got {base_url!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
                or max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = _check_seconds(timeout, "timeout")
        self.connect_timeout = min(_check_seconds(connect_timeout, "connect_timeout"), self.timeout)
        self.protocol = protocol
        self.max_connections = max_connections
        self.retry = retry_policy or RetryPolicy(max_retries=max_retries)
        self._api_key = api_key
        self._headers = dict(headers or {})
        self._rand = random.Random()
        self.stamp_start = bool(stamp_start)

    def headers_at(self, request: HttpRequest, now: float) -> Mapping[str, str]:
        """The headers of one try of ``request`` sent at ``now`` (Unix time): with
        ``stamp_start``, ``X-Request-Start`` says when, so a server that trusts it counts
        the request's timeout from then (time in a queue before it is read included)."""
        if not self.stamp_start:
            return request.headers
        return {**request.headers, "X-Request-Start": f"t={int(now * 1e6)}"}

    # -- transport configuration ----------------------------------------------------------
    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client`` / ``httpx.AsyncClient``."""
        headers = {"User-Agent": f"actserve-client/{__version__}", "Accept-Encoding": "identity",
                   **self._headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout, connect=self.connect_timeout),
            "limits": httpx.Limits(max_connections=self.max_connections,
                                   max_keepalive_connections=self.max_connections),
            "follow_redirects": False,
        }

    def http_timeout(self, call: Call) -> httpx.Timeout | None:
        if call.request.timeout is None:
            return None
        return httpx.Timeout(call.request.timeout, connect=min(self.connect_timeout,
                                                               call.request.timeout))

    def concurrency(self, concurrency: int | None) -> int:
        n = DEFAULT_CONCURRENCY if concurrency is None else concurrency
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        return min(n, self.max_connections)

    # -- building calls ---------------------------------------------------------------------
    def activate_call(self, name: str, x: object, *, compute_dtype: object = None,
                      amp: bool | None = False, inplace: bool | None = False,
                      timeout: float | None = None, protocol: str | None = None,
                      options: Mapping[str, Any] | None = None,
                      region: _shm.Region | None = None, outputs: Any = None,
                      grad_output: Any = None, report: Any = None) -> Call:
        """The call for one activation; with ``region`` (a leased shared-memory region),
        the tensors travel through it (v2 only) and only JSON goes over HTTP."""
        protocol = self.protocol if protocol is None else protocol
        if protocol not in PROTOCOLS:
            raise InvalidInputError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
        wire, kind = to_wire(x)
        extra, params = _protocol.split_settings(options or {})
        settings: dict[str, Any] = {}
        if compute_dtype is not None:
            settings["compute_dtype"] = dtype_name(compute_dtype, "compute_dtype")
        if amp is not None:
            settings["amp"] = bool(amp)
        if extra.get("amp_dtype") is not None:
            settings["amp_dtype"] = dtype_name(extra["amp_dtype"], "amp_dtype")
        if inplace is not None:
            settings["inplace"] = bool(inplace)
        if timeout is not None:
            try:
                settings["timeout"] = _check_seconds(timeout, "timeout")
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
        if extra.get("priority") is not None:
            settings["priority"] = extra["priority"]
        if extra.get("expr") is not None:
            if not isinstance(extra["expr"], str):
                raise InvalidInputError(f"expr must be a string, got {extra['expr']!r}")
            settings["expr"] = extra["expr"]
        request_id = uuid.uuid4().hex
        if outputs is not None or grad_output is not None or report is not None:
            return self._lab_call(name, wire, kind, settings, params, request_id, timeout,
                                  outputs, grad_output, report)
        if region is not None:
            offset = _shm.out_offset(wire.nbytes)
            out_bytes = region.size - offset
            _shm.write_input(region, wire.storage)
            request = _protocol.build_v2_shm(name, wire, settings, params, request_id,
                                             region.name, offset, out_bytes)
        else:
            request = _protocol.build(protocol, name, wire, settings, params, request_id)
        request.headers["X-Request-Id"] = request_id
        if timeout is not None:
            request = HttpRequest(request.method, request.path, request.headers, request.content,
                                  request.params, settings["timeout"] + DEADLINE_GRACE_S)

        def parse(headers: Mapping[str, str], content: bytes, _kind: Kind = kind) -> Any:
            if region is not None:
                result = _protocol.parse_v2_shm(content, region.buf, _shm.out_offset(wire.nbytes))
            else:
                result = _protocol.parse(protocol, headers, content)
            if result.shape != wire.shape:  # activations are elementwise
                raise MalformedResponseError(
                    f"the server answered shape {list(result.shape)} for an input of shape "
                    f"{list(wire.shape)}")
            return from_wire(result.storage, result.dtype, _kind)

        return Call(request, parse, request_id)

    def _lab_call(self, name: str, wire, kind: Kind, settings: dict, params: dict,
                  request_id: str, timeout: float | None, outputs: Any, grad_output: Any,
                  report: Any) -> Call:
        """A gradient and/or reports (docs/lab.md): always the native binary format."""
        if outputs is None:
            outputs = ["value", "grad"] if grad_output is not None else ["value"]
        names = _protocol.lab_names(outputs, _protocol.LAB_OUTPUTS, "outputs")
        reports = _protocol.lab_names(report or [], _protocol.LAB_REPORTS, "report")
        grad = None
        if grad_output is not None:
            grad, _ = to_wire(grad_output, "grad_output")
            if grad.dtype != wire.dtype or grad.shape != wire.shape:
                raise InvalidInputError(
                    f"grad_output must have the input's dtype {wire.dtype} and shape "
                    f"{list(wire.shape)}; got {grad.dtype} {list(grad.shape)}")
        request = _protocol.build_native_lab(name, wire, settings, params, names, grad,
                                             reports)
        request.headers["X-Request-Id"] = request_id
        if timeout is not None:
            request = HttpRequest(request.method, request.path, request.headers,
                                  request.content, request.params,
                                  settings["timeout"] + DEADLINE_GRACE_S)

        def parse(headers: Mapping[str, str], content: bytes) -> Answer:
            parts = _protocol.parse_native_lab(headers, content)
            out = {}
            for part in ("value", "grad"):
                w = parts.get(part)
                if w is not None:
                    if w.shape != wire.shape:
                        raise MalformedResponseError(
                            f"the server answered shape {list(w.shape)} for an input of "
                            f"shape {list(wire.shape)}")
                    out[part] = from_wire(w.storage, w.dtype, kind)
            return Answer(out.get("value"), out.get("grad"), parts["report"])

        return Call(request, parse, request_id)

    def shm_bytes(self, x: object, compute_dtype: object, amp: bool | None,
                  protocol: str | None) -> int:
        """The region size a call through shared memory needs (input, aligned, then the
        output at its largest), or 0 when the call goes over HTTP."""
        if self.shared_memory == "off" or (protocol or self.protocol) != "v2":
            return 0
        wire, _ = to_wire(x)
        if wire.nbytes < self.shared_memory_threshold:
            return 0
        out_item = STORAGE[dtype_name(compute_dtype, "compute_dtype")].itemsize \
            if compute_dtype is not None else wire.storage.itemsize
        if amp:
            out_item = max(out_item, 4)  # autocast may answer float32
        return _shm.out_offset(wire.nbytes) + wire.storage.size * out_item

    def post_call(self, path: str, body: Mapping[str, Any]) -> Call:
        request_id = uuid.uuid4().hex
        request = HttpRequest("POST", path, {"X-Request-Id": request_id,
                                             "Content-Type": "application/json"},
                              json.dumps(body).encode())
        return Call(request, lambda headers, content: None, request_id, retry=False)

    def add_activation_call(self, name: str, expr: str, params: Mapping[str, Any]) -> Call:
        """``POST /v1/activations``: a custom activation; answers its catalogue entry."""
        call = self.post_call("/v1/activations", {"name": name, "expr": expr,
                                                  "params": dict(params)})

        def parse(headers: Mapping[str, str], content: bytes) -> ActivationInfo:
            try:
                return _info(json.loads(content))
            except (ValueError, TypeError, KeyError) as exc:
                raise MalformedResponseError(f"POST /v1/activations: unreadable answer: {exc}")\
                    from None

        call.parse = parse
        return call

    def delete_activation_call(self, name: str) -> Call:
        request_id = uuid.uuid4().hex
        request = HttpRequest("DELETE", _protocol.activation_path("/v1/activations/", name, ""),
                              {"X-Request-Id": request_id})
        return Call(request, lambda headers, content: None, request_id, retry=False)

    def register_call(self, region: _shm.Region) -> Call:
        return self.post_call(f"/v2/systemsharedmemory/region/{region.name}/register",
                              {"key": region.key, "offset": 0, "byte_size": region.size})

    def unregister_call(self, region: _shm.Region) -> Call:
        return self.post_call(f"/v2/systemsharedmemory/region/{region.name}/unregister", {})

    def get_call(self, path: str, parse: Callable[[Any], Any] = lambda obj: obj) -> Call:
        request_id = uuid.uuid4().hex
        request = HttpRequest("GET", path, {"X-Request-Id": request_id})

        def parse_json(headers: Mapping[str, str], content: bytes) -> Any:
            try:
                return parse(json.loads(content))
            except (ValueError, TypeError, KeyError) as exc:
                raise MalformedResponseError(f"GET {path}: unreadable answer: {exc}") from None

        return Call(request, parse_json, request_id)

    def catalogue_call(self) -> Call:
        def parse(obj: Any) -> dict[str, ActivationInfo]:
            return {a["name"]: _info(a) for a in obj["activations"]}

        return self.get_call("/v1/activations", parse)

    def stats_call(self) -> Call:
        return self.get_call("/v1/stats")

    def probe_call(self, path: str) -> Call:
        request_id = uuid.uuid4().hex
        request = HttpRequest("GET", path, {"X-Request-Id": request_id})
        return Call(request, lambda headers, content: True, request_id, retry=False, probe=True)

    # -- reading answers ------------------------------------------------------------------
    def on_response(self, call: Call, retries_done: int, status: int,
                    headers: Mapping[str, str], content: bytes) -> Outcome:
        request_id = headers.get("x-request-id") or call.request_id
        if call.probe:
            return Outcome(value=200 <= status < 300)
        if 200 <= status < 300:
            try:
                return Outcome(value=call.parse(headers, content))
            except MalformedResponseError as exc:
                exc.status, exc.request_id = status, request_id
                return Outcome(error=exc)
        return self._maybe_retry(call, retries_done, self.status_error(status, headers, content,
                                                                       request_id))

    def on_transport_error(self, call: Call, retries_done: int, exc: Exception) -> Outcome:
        if call.probe and isinstance(exc, httpx.TransportError):
            return Outcome(value=False)
        return self._maybe_retry(call, retries_done, self.transport_error(call, exc), exc)

    def status_error(self, status: int, headers: Mapping[str, str], content: bytes,
                     request_id: str | None) -> APIStatusError:
        message, error_type, body = _protocol.error_message(content, f"HTTP {status}")
        cls = error_class(status)
        if issubclass(cls, OverloadedError):
            return cls(message, status=status, request_id=request_id, body=body,
                       error_type=error_type,
                       retry_after=parse_retry_after(headers.get("retry-after"),
                                                     response_date(headers.get("date"))))
        return cls(message, status=status, request_id=request_id, body=body, error_type=error_type)

    def transport_error(self, call: Call, exc: Exception) -> ActserveError:
        """Translate an httpx exception at the boundary (raised ``from`` it by the shell)."""
        where = f"{call.request.method} {self.base_url}{call.request.path}"
        if isinstance(exc, httpx.TimeoutException):
            phase = {httpx.ConnectTimeout: "connect", httpx.ReadTimeout: "read",
                     httpx.WriteTimeout: "write", httpx.PoolTimeout: "pool"}.get(type(exc))
            limit = call.request.timeout or self.timeout
            if phase == "connect":
                limit = min(limit, self.connect_timeout)
            return APITimeoutError(f"{where}: no answer within {limit:g} s ({phase} timeout)",
                                   request_id=call.request_id, phase=phase)
        if isinstance(exc, httpx.DecodingError):
            return MalformedResponseError(f"{where}: undecodable body: {exc}",
                                          request_id=call.request_id)
        detail = str(exc) or type(exc).__name__
        return APIConnectionError(f"{where}: connection failed: {detail}",
                                  request_id=call.request_id)

    def _maybe_retry(self, call: Call, retries_done: int, error: ActserveError,
                     cause: BaseException | None = None) -> Outcome:
        delay = None
        if call.retry:
            delay = self.retry.next_delay(retries_done, error, self._rand.random())
        return Outcome(error=error, cause=cause, retry_in=delay)
