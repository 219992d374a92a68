"""``/lab``: the lab you can look at (docs/lab.md, "The lab page"). One HTML page, one ES
module and one stylesheet from ``lab_assets/``, and the vendored uPlot
(``lab_assets/vendor/``, fetched by pinned version with ``scripts/vendor_lab_assets.sh``);
nothing comes from a CDN and nothing is built at install time.

The page and its assets are static and hold nothing secret, so they are served outside the
API keys (a browser cannot attach a bearer token to a page load): the page asks for a key
when the API answers 401 and sends it as ``Authorization: Bearer`` from the tab's memory.
They keep the request id, the access log and the allowed-hosts check of every other route.
Every answer of the page carries a strict Content-Security-Policy (no inline script or
style, nothing from elsewhere)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.http.guard import Guard
from service.http.middleware import RequestContext

PAGE = "/lab"
ASSETS = "/lab-assets"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def assets_dir() -> str:
    return str(files("service.http") / "lab_assets")


async def _page(request) -> FileResponse:
    return FileResponse(f"{assets_dir()}/lab.html", media_type="text/html; charset=utf-8",
                        headers=HEADERS)


class _Secured:
    """The security headers on every answer of the page's own app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()
                         if k.lower().encode() not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _LabFirst:
    """``/lab`` and ``/lab-assets/...`` to the page's app, everything else to the server's
    stack (where the API keys are checked)."""

    def __init__(self, page, stack) -> None:
        self.page = page
        self.stack = stack

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if path == PAGE or path.startswith(ASSETS + "/"):
                return await self.page(scope, receive, send)
        return await self.stack(scope, receive, send)


def install(app: FastAPI, stack, access_log=None):
    """The server's ASGI ``stack`` with the page in front of it; links the page from the
    OpenAPI description (so from ``/docs``)."""
    settings = app.state.services.settings
    page_app = Starlette(routes=[
        Route(PAGE, _page, methods=["GET", "HEAD"]),
        Mount(ASSETS, app=StaticFiles(directory=assets_dir()), name="lab-assets"),
    ])
    page = RequestContext(Guard(_Secured(page_app), allowed_hosts=settings.allowed_host_list),
                          access_log=access_log, api_keys=[])
    lab_link = (f"The lab page: [{PAGE}]({PAGE}) (curves and gradients, error maps, cost, "
                "registration).")
    app.description = f"{app.description}\n\n{lab_link}" if app.description else lab_link
    return _LabFirst(page, stack)
