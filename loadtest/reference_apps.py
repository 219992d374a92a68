"""The two reference servers the sweep measures beside actserve, on the same uvicorn settings.

* ``floor``: reads the body and returns a tiny constant. Nothing can answer an HTTP request
  with a body of that size faster on this stack, so it is the floor that every actserve
  figure is divided by.
* ``naive``: the FastAPI endpoint one writes first: a pydantic model with a list of floats,
  one torch call per request, the list sent back.
* ``echo``: reads the body and sends it back unchanged: the same bytes each way as a binary
  activation answer, with no work at all. For large tensors it shows how much of the gap to
  the floor is only the answer's size.

Run one with ``python -m loadtest.reference_apps floor|naive|echo --port N``.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations.
"""

import argparse
import sys

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

CONSTANT = b'{"ok":true}'


def floor_app():
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/{path:path}")
    async def floor(path: str, request: Request) -> Response:
        body = await request.body()
        return Response(CONSTANT, media_type="application/json",
                        headers={"X-Body-Bytes": str(len(body))})

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


def echo_app():
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/{path:path}")
    async def echo(path: str, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


def naive_app():
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)  # the same intra-op thread count as actserve's default

    class Payload(BaseModel):
        data: list[float]

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/activations/{name}")
    def activate(name: str, payload: Payload) -> dict:
        x = torch.tensor(payload.data, dtype=torch.float32)
        y = getattr(F, name)(x)
        return {"activation": name, "shape": list(y.shape), "dtype": "float32",
                "data": y.tolist()}

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


APPS = {"floor": floor_app, "naive": naive_app, "echo": echo_app}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m loadtest.reference_apps")
    p.add_argument("app", choices=sorted(APPS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout-keep-alive", type=int, default=5)
    a = p.parse_args(argv)
    # The same uvicorn settings as ``actserve serve`` (service/cli.py).
    uvicorn.run(APPS[a.app](), host=a.host, port=a.port, log_level="warning", access_log=False,
                timeout_keep_alive=a.timeout_keep_alive, loop="auto", http="auto",
                lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
