"""The hot-route fast path: its query parsing matches Starlette's, and an unexpected error
in a handler is answered (a 500 in the API's error format), never dropped."""

from __future__ import annotations

import asyncio
import logging

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from service.codecs.native import parse_query
from service.http.fastpath import FastPath

QUERY = st.text(alphabet="ab=&%+2F0,.-_", max_size=40)


@settings(max_examples=400, deadline=None)
@given(QUERY)
def test_parse_query_is_starlettes_mapping(text):
    assert parse_query(text.encode("latin-1")) == dict(QueryParams(text))


def _call(app, path: str) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [],
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


async def _broken(request, **_):
    raise ValueError("a bug")


async def _inner(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_unexpected_error_in_a_hot_route_is_a_logged_500(caplog):
    app = FastPath(_inner, routes=[(r"/v1/activations/(?P<name>[^/]+)", _broken),
                                   (r"/v2/models/(?P<name>[^/]+)/infer", _broken)])
    with caplog.at_level(logging.ERROR, logger="actserve"):
        native = _call(app, "/v1/activations/relu")
        v2 = _call(app, "/v2/models/relu/infer")
    assert native[0]["status"] == 500 and v2[0]["status"] == 500
    assert orjson.loads(native[1]["body"])["error"]["type"] == "internal_error"
    assert orjson.loads(v2[1]["body"]) == {"error": "internal server error"}
    assert sum("unexpected error serving" in r.message for r in caplog.records) == 2
    # other paths go to the framework's stack untouched
    assert _call(app, "/healthz")[0]["status"] == 204
