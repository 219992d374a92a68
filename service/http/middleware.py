"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks contextvars and streaming).

* Request ids: ``X-Request-Id`` taken from the client when it is sane, else generated, and
  echoed on every response.
* Access log: one line per request, with whatever the route put in
  ``scope["actserve"]["log"]`` (activation, shape, dtypes, timings), handed to an
  ``AccessLog`` that writes it off the event loop (``service/observability/logs.py``).
* ``Server-Timing`` on error answers of activation routes: the route leaves the value in
  ``scope["actserve"]["server_timing"]`` when an exception, not a response, leaves it.
* Bearer-token auth when API keys are configured (constant-time comparison); health,
  readiness and metrics stay open.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid

from service.errors import Unauthorized
from service.exchange.auth import authorised
from service.http.error_responses import error_response
from service.observability.logs import AccessLog
from service.observability.recorder import Recorder

REQUEST_ID = r"^[A-Za-z0-9._:\-]{1,128}$"  # a client's X-Request-Id is kept when it matches
_ID_RE = re.compile(REQUEST_ID)
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


class RequestContext:
    def __init__(self, app, *, access_log: AccessLog | None, api_keys: list[str],
                 recorder: Recorder | None = None) -> None:
        self.app = app
        self.recorder = recorder
        self.access_log = access_log
        self.api_keys = [k.encode() for k in api_keys]
        # Generated ids: a random per-process prefix and a counter (unique, and cheaper
        # than a uuid4 per request).
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._ids = itertools.count(1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                rid = text if _ID_RE.match(text) else None
                break
        rid = rid or f"{self._id_prefix}{next(self._ids):x}"
        ctx = {"request_id": rid, "log": {}}
        scope["actserve"] = ctx
        status_box = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                headers = [*message.get("headers", []), rid_header]
                timing = ctx.get("server_timing")
                if timing and not any(k.lower() == b"server-timing" for k, _ in headers):
                    headers.append((b"server-timing", timing.encode()))
                message["headers"] = headers
            await send(message)

        try:
            if self.api_keys and not self._authorised(scope):
                resp = error_response(scope["path"], 401, "unauthorized",
                                      "missing or invalid bearer token (Authorization: Bearer ...)")
                resp.headers["WWW-Authenticate"] = "Bearer"
                if self.recorder is not None:
                    self.recorder.reject(Unauthorized("unauthorized"))
                await resp(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log is not None and self.access_log.enabled():
                client = scope.get("client")
                line = {
                    "id": rid,
                    "client": client[0] if client else None,
                    "transport": "http",
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status_box[0],
                    "ms": round((time.perf_counter() - start) * 1000, 3),
                    **ctx["log"],
                }
                self.access_log.write(line)

    def _authorised(self, scope) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return authorised(value, self.api_keys)
        return False
