"""Domain errors -> HTTP responses: the native body, the v2 body, and Retry-After.

Every route raises ``ActserveError`` subclasses (``service.errors``); the handlers here are
the only place a status code is chosen. Under ``/v2`` every error body is
``{"error": "<message>"}``, framework errors (404 route, 405, 422) included.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.errors import ActserveError, error_body


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, type_: str, message: str,
                   retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response(error_body(is_v2(path), type_, message), status_code=status,
                    headers=headers, media_type="application/json")


def from_error(path: str, exc: ActserveError) -> Response:
    return error_response(path, exc.status, exc.type, exc.message, exc.retry_after)


def install(app: FastAPI) -> None:
    async def on_domain(request: Request, exc: ActserveError) -> Response:
        return from_error(request.url.path, exc)

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request.url.path, exc.status_code, type_, str(exc.detail))

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(request.url.path, 400, "invalid_request",
                              f"{where}: {first.get('msg', 'invalid request')}")

    app.add_exception_handler(ActserveError, on_domain)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
