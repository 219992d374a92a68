"""Every error the client raises, as one tree, and the table from HTTP status to class.

::

    ActserveError                          base; .message, .status (None if no answer), .request_id
    ├── InvalidInputError (ValueError)     refused locally, before anything is sent
    ├── MalformedResponseError             the server's answer could not be understood
    ├── APIConnectionError                 no answer: refused, reset, DNS, TLS ...  (retried)
    │   └── APITimeoutError                no answer in time (retried only if connecting timed out)
    └── APIStatusError                     the server answered with an error status; .body
        ├── BadRequestError            400 invalid body, shape, dtype or parameter (also 405, 422)
        ├── AuthenticationError        401 missing or wrong API key
        ├── NotFoundError              404 unknown activation
        ├── ConflictError              409 a custom activation of that name exists
        ├── RequestTimeoutError        408 the request body arrived too slowly
        ├── RequestTooLargeError       413 body over the server's limit
        ├── UnsupportedMediaTypeError  415
        ├── ServerError                500 and other 5xx: compute failed for this request
        ├── OverloadedError            503 queue full, not ready, draining; .retry_after  (retried)
        └── DeadlineExceededError      504 the deadline passed before compute             (retried)

The rows mirror the server's own error table (``service/errors.py``): one class per status.
"""

from __future__ import annotations


class ActserveError(Exception):
    """Base of every error raised by ``actserve_client``."""

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        if self.request_id:
            parts.append(f"[request id {self.request_id}]")
        return " ".join(parts)


class InvalidInputError(ActserveError, ValueError):
    """The input cannot be sent as it is (unsupported dtype, ragged list, ...)."""


class MalformedResponseError(ActserveError):
    """The server answered 200 with a body this client cannot read."""


class APIConnectionError(ActserveError):
    """No HTTP answer: connection refused or reset, name resolution, TLS, protocol error."""


class APITimeoutError(APIConnectionError):
    """No answer within the timeout. ``phase`` says what timed out: "connect", "read",
    "write" or "pool" (waiting for a free connection), or None."""

    def __init__(self, message: str, *, request_id: str | None = None, phase: str | None = None):
        super().__init__(message, request_id=request_id)
        self.phase = phase


class APIStatusError(ActserveError):
    """The server answered with an error status. ``body`` is the decoded error body."""

    def __init__(self, message: str, *, status: int, request_id: str | None = None,
                 body: object = None, error_type: str | None = None):
        super().__init__(message, status=status, request_id=request_id)
        self.body = body
        self.error_type = error_type


class BadRequestError(APIStatusError):
    """400: the request was invalid; the message names the field and the allowed values."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: no such activation (or route)."""


class ConflictError(APIStatusError):
    """409: a custom activation of that name exists (or the name is reserved)."""


class RequestTimeoutError(APIStatusError):
    """408: the server gave up waiting for the request body (a slow or stalled upload)."""


class RequestTooLargeError(APIStatusError):
    """413: the body, or the tensor's element count, is over the server's limit."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: content type or content encoding the server does not accept."""


class ServerError(APIStatusError):
    """500 (and other 5xx): the computation failed for this request."""


class OverloadedError(APIStatusError):
    """503: queue full, not ready or draining. ``retry_after`` is the server's hint, in seconds."""

    def __init__(self, message: str, *, status: int, request_id: str | None = None,
                 body: object = None, error_type: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, status=status, request_id=request_id, body=body,
                         error_type=error_type)
        self.retry_after = retry_after


class DeadlineExceededError(APIStatusError):
    """504: the request's deadline passed before the server could compute it."""


STATUS_TO_ERROR: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    405: BadRequestError,
    408: RequestTimeoutError,
    413: RequestTooLargeError,
    415: UnsupportedMediaTypeError,
    422: BadRequestError,
    500: ServerError,
    503: OverloadedError,
    504: DeadlineExceededError,
}


def error_class(status: int) -> type[APIStatusError]:
    """The class raised for an error status (unknown 5xx -> ServerError)."""
    if status in STATUS_TO_ERROR:
        return STATUS_TO_ERROR[status]
    if status >= 500:
        return ServerError
    return APIStatusError
