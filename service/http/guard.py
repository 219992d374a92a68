"""Request guards that run before any route: allowed hosts and browser "simple" bodies.

* **Allowed hosts** (``ACTSERVE_ALLOWED_HOSTS``): a request whose ``Host`` is not listed is
  refused with 400. This stops DNS rebinding: a web page whose name is made to resolve to
  127.0.0.1 still sends its own name as ``Host``. Bound to loopback the default is the local
  names; bound to another address, any host (set the list to restrict it).
* **No cross-site "simple" requests**: a browser sends ``text/plain``,
  ``application/x-www-form-urlencoded`` and ``multipart/form-data`` POSTs cross-site without
  a CORS preflight, so no POST with those types is served (415; the routes call
  ``refuse_simple_type``). The native API also needs ``Content-Type: application/json``
  for JSON (a POST without a Content-Type is refused); ``/v2`` accepts a missing Content-Type, as the stock
  tritonclient sends none, and a browser cannot send a body without one.

Pure ASGI; answers use the API's error format (``service.http.error_responses``).
"""

from __future__ import annotations

from service.errors import ActserveError, InvalidRequest, echo
from service.http.error_responses import from_error


def host_name(raw: str) -> str:
    """``Host`` without its port, lower-case (``[::1]:8000`` -> ``[::1]``)."""
    raw = raw.strip().lower()
    if raw.startswith("["):
        end = raw.find("]")
        return raw[:end + 1] if end > 0 else raw
    return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw


def host_allowed(name: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
            return True
    return False


class Guard:
    def __init__(self, app, *, allowed_hosts: list[str], recorder=None) -> None:
        self.app = app
        self.allowed_hosts = None if "*" in allowed_hosts else allowed_hosts
        self.recorder = recorder  # counts each refused Host (reason "invalid")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed_hosts is not None:
            problem = self._problem(scope)
            if problem is not None:
                if self.recorder is not None:
                    self.recorder.reject(problem)
                await from_error(scope["path"], problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope) -> ActserveError | None:
        host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                break
        if host is not None and not host_allowed(host_name(host), self.allowed_hosts):
            return InvalidRequest(f"Host {echo(host)} is not allowed on this server "
                                  "(ACTSERVE_ALLOWED_HOSTS)")
        return None
