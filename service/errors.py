"""The one error family of the server and its one table to the wire.

::

    ActserveError                      (500 unless a subclass says otherwise)
    ├── InvalidRequest                 400  malformed body, shape/data mismatch, bad dtype/param
    ├── UnknownActivation              404
    ├── RequestTimeout                 408  body not received within body_timeout_s
    ├── RequestTooLarge                413  body over max_request_bytes
    ├── UnsupportedMediaType           415
    ├── Unavailable                    503  + Retry-After
    │   ├── QueueFull                       the bounded queue is full
    │   ├── NotReady                        warm-up not finished / executor restarting
    │   └── Draining                        shutting down, no new work
    ├── DeadlineExceeded               504  deadline passed before compute
    ├── Unauthorized                   401  missing or wrong bearer token
    └── ComputeError                   500  compute failed for this request alone

Routes and codecs raise these; ``service.http.error_responses`` turns them into the native body
``{"error": {"type", "message"}}`` or the v2 body ``{"error": "message"}``, and
``service.grpc.service`` into the gRPC status code ``WIRE_TABLE`` puts beside the HTTP status.
"""

from __future__ import annotations

import reprlib

import orjson

MAX_ECHO = 80

# Bounded work whatever the value: a few levels deep, a few items wide, short strings, so
# that a deeply nested or huge value (a 990-level list, a million-item params entry) costs
# microseconds and never reaches Python's recursion limit.
_REPR = reprlib.Repr()
for _name, _limit in (("maxlevel", 3), ("maxtuple", 6), ("maxlist", 6), ("maxarray", 6),
                      ("maxdict", 4), ("maxset", 6), ("maxfrozenset", 6), ("maxdeque", 6),
                      ("maxstring", MAX_ECHO), ("maxlong", 40), ("maxother", MAX_ECHO)):
    setattr(_REPR, _name, _limit)


def error_body(v2: bool, type_: str, message: str) -> bytes:
    """An error's JSON body in the API's format: the app's handlers
    (``service.http.error_responses``), the HTTP protocol's own refusals (``shed.py``) and
    the probe port write it."""
    return orjson.dumps({"error": message} if v2 else
                        {"error": {"type": type_, "message": message}})


def echo(value: object) -> str:
    """A bounded slice of user input, safe to put in an error message."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile value must never turn a 400 into a 500
        text = f"<{type(value).__name__}>"
    if len(text) > MAX_ECHO:
        text = text[:MAX_ECHO] + "...(truncated)"
    return text


class ActserveError(Exception):
    status = 500
    type = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ActserveError):
    status = 400
    type = "invalid_request"


class UnknownActivation(ActserveError):
    status = 404
    type = "not_found"


class Conflict(ActserveError):
    status = 409
    type = "conflict"


class RequestTimeout(ActserveError):
    status = 408
    type = "request_timeout"


class RequestTooLarge(ActserveError):
    status = 413
    type = "request_too_large"


class UnsupportedMediaType(ActserveError):
    status = 415
    type = "unsupported_media_type"


class Unauthorized(ActserveError):
    status = 401
    type = "unauthorized"


class Unavailable(ActserveError):
    status = 503
    type = "unavailable"
    retry_after = 1


class QueueFull(Unavailable):
    type = "queue_full"


class NotReady(Unavailable):
    type = "not_ready"


class Draining(Unavailable):
    type = "draining"


class DeadlineExceeded(ActserveError):
    status = 504
    type = "deadline_exceeded"


class ComputeError(ActserveError):
    status = 500
    type = "compute_error"


# The one table to the wire: each error's HTTP status and, side by side, the gRPC status
# code it is answered with over gRPC (``service.grpc.service`` looks the code up by name).
WIRE_TABLE: dict[type[ActserveError], tuple[int, str]] = {
    InvalidRequest: (400, "INVALID_ARGUMENT"),
    Unauthorized: (401, "UNAUTHENTICATED"),
    UnknownActivation: (404, "NOT_FOUND"),
    Conflict: (409, "ALREADY_EXISTS"),
    RequestTimeout: (408, "DEADLINE_EXCEEDED"),
    RequestTooLarge: (413, "RESOURCE_EXHAUSTED"),
    UnsupportedMediaType: (415, "INVALID_ARGUMENT"),
    QueueFull: (503, "UNAVAILABLE"),
    NotReady: (503, "UNAVAILABLE"),
    Draining: (503, "UNAVAILABLE"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
    ComputeError: (500, "INTERNAL"),
}
# By status, for errors outside the table (a subclass with a status of its own)
GRPC_BY_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ALREADY_EXISTS",
                  413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# The status table, for documentation and tests: every row of the README's "Errors" table.
STATUS_TABLE: dict[type[ActserveError], int] = {cls: row[0] for cls, row in WIRE_TABLE.items()}


def grpc_code(exc: ActserveError) -> str:
    """The gRPC status code's name an error is answered with."""
    for cls in type(exc).__mro__:
        row = WIRE_TABLE.get(cls)
        if row is not None and row[0] == exc.status:
            return row[1]
    return GRPC_BY_STATUS.get(exc.status, "INTERNAL")
