"""The hot routes without the framework's per-request machinery.

``POST /v1/activations/{name}`` and ``POST /v2/models/{m}[/versions/{v}]/infer`` are matched
here with one regular expression each and handed straight to their handlers, skipping
FastAPI's route table walk and dependency solving (about a sixth of the event loop's time
per small request, measured with py-spy; see docs/benchmarks.md). The routes stay declared
on the FastAPI app, so the OpenAPI document and every other route are unchanged; domain
errors become responses through the same ``error_responses`` table.

It sits outside the framework's middlewares (their error middleware included), so it
answers an unexpected exception itself: a logged 500 in the API's error format, as the
framework would, and never a dropped connection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from service.errors import ActserveError
from service.http.error_responses import error_response, from_error

log = logging.getLogger("actserve")

Handler = Callable[..., Awaitable[Response]]


class FastPath:
    def __init__(self, app, routes: list[tuple[str, Handler]]) -> None:
        self.app = app
        self.routes = [(re.compile(pattern), handler) for pattern, handler in routes]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, handler in self.routes:
                match = pattern.fullmatch(path)
                if match is not None:
                    await self._serve(handler, match, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(handler: Handler, match: re.Match, scope, receive, send) -> None:
        path = scope["path"]
        try:
            try:
                response = await handler(request=Request(scope, receive), **match.groupdict())
            except ActserveError as exc:
                response = from_error(path, exc)
            await response(scope, receive, send)
        except Exception as exc:
            log.exception("unexpected error serving %s", path)
            try:
                await error_response(path, 500, "internal_error", "internal server error")(
                    scope, receive, send)
            except RuntimeError:
                raise exc from None  # the answer had begun: the server closes the connection
