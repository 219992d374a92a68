"""The client's I/O-free core on its own: retry policy, Retry-After, the status table, the
wire formats (cross-checked against the server's own codecs), and array conversions."""

from __future__ import annotations

import email.utils
import inspect
import json

import actserve_client as ac
import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
from actserve_client import _arrays, _protocol
from actserve_client._base import Call, ClientCore, Outcome
from actserve_client._exceptions import error_class
from actserve_client._retry import RetryPolicy, parse_retry_after, response_date

from service import errors as server_errors
from service.codecs import v2 as server_v2
from service.codecs.native import read_binary, read_json, write_binary, write_json
from service.http.error_responses import from_error

from .conftest import same_bits

SHAPES = [(), (0,), (3,), (2, 0, 4), (2, 3), (1, 2, 1, 3)]


# -- Retry-After and the retry policy ---------------------------------------------------------
def test_parse_retry_after():
    assert parse_retry_after(None) is None
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(10, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now=now) == 0.0
    assert parse_retry_after(date) is None  # a date needs a reference time: the core has no clock
    assert response_date(email.utils.formatdate(now, usegmt=True)) == now
    assert response_date("yesterday") is None and response_date(None) is None


def _overloaded(retry_after=None):
    return ac.OverloadedError("full", status=503, retry_after=retry_after)


def test_backoff_is_exponential_capped_and_jittered():
    p = RetryPolicy(max_retries=10, initial_backoff=0.5, max_backoff=4.0)
    err = _overloaded()
    for n, base in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        assert p.next_delay(n, err, 0.0) == base / 2
        assert base / 2 <= p.next_delay(n, err, 0.999) < base
    assert len({p.next_delay(1, err, r / 10) for r in range(10)}) == 10  # jitter spreads
    assert p.next_delay(10, err, 0.5) is None  # retries used up


def test_retry_after_overrides_the_backoff_up_to_a_cap():
    p = RetryPolicy(max_retries=3, initial_backoff=0.001)
    assert p.next_delay(0, _overloaded(2.0), 0.7) == 2.0
    assert p.next_delay(2, _overloaded(0.0), 0.7) == 0.0
    assert p.next_delay(0, _overloaded(p.max_retry_after + 1), 0.7) is None


@pytest.mark.parametrize(("error", "retried"), [
    (_overloaded(), True),
    (ac.DeadlineExceededError("late", status=504), True),
    (ac.APIConnectionError("refused"), True),
    (ac.APITimeoutError("slow", phase="connect"), True),
    (ac.APITimeoutError("slow", phase="read"), False),
    (ac.APITimeoutError("slow", phase="pool"), False),
    (ac.BadRequestError("bad", status=400), False),
    (ac.AuthenticationError("who", status=401), False),
    (ac.NotFoundError("where", status=404), False),
    (ac.RequestTooLargeError("big", status=413), False),
    (ac.RequestTimeoutError("slow upload", status=408), False),
    (ac.ServerError("boom", status=500), False),
    (ac.MalformedResponseError("garbled"), False),
])
def test_what_is_retried(error, retried):
    p = RetryPolicy(max_retries=1)
    assert (p.next_delay(0, error, 0.5) is not None) is retried
    assert p.next_delay(1, error, 0.5) is None


def test_retry_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff=-1)


# -- the status table mirrors the server's ------------------------------------------------------
CLIENT_FOR = {
    server_errors.InvalidRequest: ac.BadRequestError,
    server_errors.Unauthorized: ac.AuthenticationError,
    server_errors.UnknownActivation: ac.NotFoundError,
    server_errors.Conflict: ac.ConflictError,
    server_errors.RequestTimeout: ac.RequestTimeoutError,
    server_errors.RequestTooLarge: ac.RequestTooLargeError,
    server_errors.UnsupportedMediaType: ac.UnsupportedMediaTypeError,
    server_errors.QueueFull: ac.OverloadedError,
    server_errors.NotReady: ac.OverloadedError,
    server_errors.Draining: ac.OverloadedError,
    server_errors.DeadlineExceeded: ac.DeadlineExceededError,
    server_errors.ComputeError: ac.ServerError,
}


def test_every_row_of_the_server_error_table_has_its_client_class():
    assert set(CLIENT_FOR) == set(server_errors.STATUS_TABLE)
    for server_cls, status in server_errors.STATUS_TABLE.items():
        assert error_class(status) is CLIENT_FOR[server_cls]
    assert error_class(502) is ac.ServerError
    assert error_class(418) is ac.APIStatusError
    assert issubclass(ac.InvalidInputError, ValueError)
    assert issubclass(ac.APITimeoutError, ac.APIConnectionError)


@pytest.mark.parametrize("path", ["/v1/activations/relu", "/v2/models/relu/infer"])
@pytest.mark.parametrize("server_cls", list(CLIENT_FOR))
def test_server_error_bodies_become_client_errors(path, server_cls):
    """The server's own error encoder, read by the client core: class, message, type,
    Retry-After and request id all survive, on native and v2 paths alike."""
    resp = from_error(path, server_cls("the message"))
    headers = httpx.Headers({k.decode(): v.decode() for k, v in resp.raw_headers})
    core = ClientCore("http://127.0.0.1:1")
    error = core.status_error(resp.status_code, headers, resp.body, "rid-1")
    assert type(error) is CLIENT_FOR[server_cls]
    assert error.message == "the message" and error.status == resp.status_code
    assert error.request_id == "rid-1" and "rid-1" in str(error)
    if path.startswith("/v1"):
        assert error.error_type == server_cls.type
    if resp.status_code == 503:
        assert error.retry_after == float(server_cls.retry_after)


def test_a_retry_after_date_counts_from_the_servers_date_not_the_clients_clock():
    core = ClientCore("http://127.0.0.1:1")
    sent = 1_700_000_000.0  # long past: a client clock would make the hint 0
    headers = httpx.Headers({"date": email.utils.formatdate(sent, usegmt=True),
                             "retry-after": email.utils.formatdate(sent + 7, usegmt=True)})
    e = core.status_error(503, headers, b'{"error": {"type": "queue_full", "message": "x"}}', None)
    assert isinstance(e, ac.OverloadedError) and e.retry_after == 7.0
    no_date = httpx.Headers({"retry-after": headers["retry-after"]})
    assert core.status_error(503, no_date, b"", None).retry_after is None


def test_error_bodies_that_are_not_json():
    core = ClientCore("http://127.0.0.1:1")
    e = core.status_error(502, httpx.Headers(), b"<html>bad gateway</html>", None)
    assert isinstance(e, ac.ServerError) and "bad gateway" in e.message
    e = core.status_error(500, httpx.Headers(), b"", None)
    assert e.message == "HTTP 500"
    e = core.status_error(422, httpx.Headers(), b'{"detail": "no"}', None)
    assert isinstance(e, ac.BadRequestError) and e.message == "no"


def test_transport_errors_are_translated():
    core = ClientCore("http://127.0.0.1:1", timeout=7, connect_timeout=2)
    call = Call(_protocol.HttpRequest("POST", "/x"), lambda h, c: None, "rid")
    e = core.transport_error(call, httpx.ConnectError("refused"))
    assert type(e) is ac.APIConnectionError and "refused" in e.message and e.request_id == "rid"
    e = core.transport_error(call, httpx.ReadTimeout("slow"))
    assert isinstance(e, ac.APITimeoutError) and e.phase == "read" and "7 s" in e.message
    e = core.transport_error(call, httpx.ConnectTimeout("slow"))
    assert e.phase == "connect" and "2 s" in e.message
    e = core.transport_error(call, httpx.DecodingError("bad gzip"))
    assert isinstance(e, ac.MalformedResponseError)
    outcome = core.on_transport_error(call, 0, httpx.ConnectError("refused"))
    assert outcome.retry_in is not None
    with pytest.raises(ac.APIConnectionError) as info:
        Outcome(error=ac.APIConnectionError("down"), cause=httpx.ConnectError("x")).unwrap()
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    probe = core.probe_call("/readyz")
    assert core.on_response(probe, 0, 503, httpx.Headers(), b"").value is False
    assert core.on_transport_error(probe, 0, httpx.ConnectError("x")).value is False


# -- wire formats, against the server's codecs -------------------------------------------------
def _wire(shape, dtype: str, seed: int = 0) -> _arrays.Wire:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        return _arrays.Wire(np.asarray(v.view(np.uint32) >> 16, dtype="<u2"), dtype)
    return _arrays.Wire(np.asarray(v, dtype=_arrays.STORAGE[dtype]), dtype)


@pytest.mark.parametrize("dtype", _arrays.NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_v2_binary_request_decodes_on_the_server_and_its_answer_parses(dtype, shape):
    wire = _wire(shape, dtype)
    settings = {"compute_dtype": "float32", "amp": False, "inplace": True, "timeout": 0.25}
    req = _protocol.build("v2", "leaky_relu", wire, settings, {"negative_slope": 0.5}, "id-1")
    assert req.path == "/v2/models/leaky_relu/infer"
    decoded = server_v2.decode(bytearray(req.content), req.headers[_protocol.V2_HEADER_LENGTH],
                               10**6)
    assert decoded.wire == dtype and decoded.id == "id-1" and decoded.binary_output
    assert same_bits(decoded.array, wire.storage)
    assert decoded.settings == {"compute_dtype": "float32", "amp": False, "inplace": True,
                                "timeout": 250_000}
    assert decoded.params == {"negative_slope": 0.5}
    body, headers = server_v2.encode("leaky_relu", decoded, decoded.array, dtype)
    if isinstance(body, list):  # a large answer leaves in pieces: the wire joins them
        body = b"".join(body)
    lower = {k.lower(): v for k, v in headers.items()}
    back = _protocol.parse("v2", lower, body)
    assert back.dtype == dtype and same_bits(back.storage, wire.storage)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_v2_json_request_decodes_on_the_server_and_its_answer_parses(dtype, shape):
    wire = _wire(shape, dtype, 1)
    req = _protocol.build("v2-json", "relu", wire, {"amp": True}, {}, "id-2")
    assert _protocol.V2_HEADER_LENGTH not in req.headers
    decoded = server_v2.decode(bytearray(req.content), None, 10**6)
    assert not decoded.binary_output and decoded.settings == {"amp": True}
    assert same_bits(decoded.array, wire.storage)
    body, headers = server_v2.encode("relu", decoded, decoded.array, dtype)
    back = _protocol.parse("v2-json", {k.lower(): v for k, v in headers.items()}, body)
    assert same_bits(back.storage, wire.storage)


@pytest.mark.parametrize("dtype", _arrays.NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_requests_decode_on_the_server_and_answers_parse(dtype, shape):
    wire = _wire(shape, dtype, 2)
    settings = {"amp": False, "timeout": 1.5}
    req = _protocol.build("native", "elu", wire, settings, {"alpha": 0.25}, "id")
    array, wdtype, s, params, _ = read_binary(bytearray(req.content), req.params, 10**6)
    assert wdtype == dtype and same_bits(array, wire.storage)
    assert s == {"amp": "false", "timeout": "1.5"} and params == {"alpha": "0.25"}
    payload, headers = write_binary(array, dtype)
    back = _protocol.parse("native", {k.lower(): v for k, v in headers.items()}, payload)
    assert same_bits(back.storage, wire.storage)

    req = _protocol.build("native-json", "elu", wire, settings, {"alpha": 0.25}, "id")
    array, wdtype, s, params, _ = read_json(req.content, 10**6)
    assert wdtype == dtype and same_bits(array, wire.storage)
    assert s == settings and params == {"alpha": 0.25}
    back = _protocol.parse("native-json", {"content-type": "application/json"},
                           write_json("elu", array, dtype))
    assert same_bits(back.storage, wire.storage)


def test_non_finite_values_travel_in_json():
    wire = _arrays.Wire(np.array([np.nan, np.inf, -np.inf, -0.0], dtype="<f4"), "float32")
    req = _protocol.build("native-json", "relu", wire, {}, {}, "id")
    assert b"NaN" in req.content and b"-Infinity" in req.content
    array, *_ = read_json(req.content, 100)
    assert same_bits(array, wire.storage)


@pytest.mark.parametrize(("headers", "body", "match"), [
    ({"inference-header-content-length": "999"}, b"{}", "outside"),
    ({}, b"[1, 2]", "not a JSON object"),
    ({}, b'{"outputs": []}', "no outputs"),
    ({}, b'{"outputs": [{"datatype": "INT8", "shape": [1], "data": [1]}]}', "INT8"),
    ({}, b'{"outputs": [{"datatype": "FP32", "shape": [-1], "data": [1]}]}', "shape"),
    ({}, b'{"outputs": [{"datatype": "FP32", "shape": [2], "data": [1]}]}', "reshape"),
    ({"inference-header-content-length": "100"},
     b'{"outputs":[{"datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}'.ljust(100)
     + b"1234", "binary_data_size"),
])
def test_malformed_v2_answers_are_reported(headers, body, match):
    with pytest.raises(ac.MalformedResponseError, match=match):
        _protocol.parse("v2", headers, body)


def test_malformed_native_answers_are_reported():
    with pytest.raises(ac.MalformedResponseError, match="X-Dtype"):
        _protocol.parse("native", {}, b"1234")
    with pytest.raises(ac.MalformedResponseError, match="bytes"):
        _protocol.parse("native", {"x-dtype": "float32", "x-shape": "2"}, b"1234")


def test_activation_names_are_quoted_into_the_path():
    wire = _wire((1,), "float32")
    req = _protocol.build("v2", "a/b c", wire, {}, {}, "id")
    assert req.path == "/v2/models/a%2Fb%20c/infer"
    with pytest.raises(ac.InvalidInputError):
        _protocol.build("v2", "", wire, {}, {}, "id")


# -- arrays -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "name"), [
    ("float32", "float32"), ("FP16", "float16"), ("BF16", "bfloat16"), ("half", "float16"),
    ("double", "float64"), ("torch.bfloat16", "bfloat16"), (np.float16, "float16"),
    (np.dtype(">f8"), "float64"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
    (ml_dtypes.bfloat16, "bfloat16"),
])
def test_dtype_names(given, name):
    assert _arrays.dtype_name(given) == name


@pytest.mark.parametrize("bad", ["int8", np.int64, torch.int32, np.complex64, object, 3])
def test_unsupported_dtypes(bad):
    with pytest.raises(ac.InvalidInputError, match="not supported"):
        _arrays.dtype_name(bad)


@pytest.mark.parametrize("bad", [
    [True, False], ["a"], [1.0, None], {"a": 1}, "1.0", None, np.array([1 + 2j]),
    np.array(["x"]), np.zeros((1,) * 33, np.float32), torch.zeros(2, dtype=torch.int64),
    torch.zeros(2).to_sparse(),
])
def test_inputs_refused_before_sending(bad):
    with pytest.raises(ac.InvalidInputError):
        _arrays.to_wire(bad)


def test_kinds_go_back_as_they_came():
    f = np.arange(6, dtype=np.float32).reshape(2, 3)
    for x, check in [
        (f, lambda y: isinstance(y, np.ndarray) and y.dtype == np.float32),
        (np.float32(2), lambda y: isinstance(y, np.float32)),
        (f.astype(ml_dtypes.bfloat16), lambda y: y.dtype == ml_dtypes.bfloat16),
        (torch.from_numpy(f).bfloat16(), lambda y: y.dtype == torch.bfloat16),
        (f.tolist(), lambda y: y == f.tolist()),
        (2, lambda y: y == 2.0 and isinstance(y, float)),
    ]:
        wire, kind = _arrays.to_wire(x)
        y = _arrays.from_wire(wire.storage.copy(), wire.dtype, kind)
        assert check(y), (x, y)


def test_results_are_aligned_writable_arrays_of_their_own():
    raw = b"\x00" + np.arange(4, dtype="<f4").tobytes()
    view = _arrays.storage_from_buffer(memoryview(raw)[1:], "float32", [4])
    assert not view.flags.writeable
    y = _arrays.from_wire(view, "float32", _arrays.Kind("numpy"))
    assert y.flags.writeable and y.flags.aligned and y.tolist() == [0.0, 1.0, 2.0, 3.0]
    t = _arrays.from_wire(view, "float32", _arrays.Kind("torch", torch.device("cpu")))
    assert t.data_ptr() % 64 == 0 and t.tolist() == [0.0, 1.0, 2.0, 3.0]


# -- the public surface and the two shells ------------------------------------------------------
def test_public_surface_is_curated():
    assert all(hasattr(ac, name) for name in ac.__all__)
    assert not [n for n in ac.__all__ if n.startswith("_") and n != "__version__"]
    assert {"Client", "AsyncClient", "ActserveError", "RetryPolicy"} <= set(ac.__all__)


def test_sync_and_async_clients_offer_the_same_methods():
    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(ac.Client) - {"close"} == public(ac.AsyncClient) - {"close", "aclose"}
    for name in ("activate", "activate_many", "wait_until_ready"):
        sync = inspect.signature(getattr(ac.Client, name))
        asyn = inspect.signature(getattr(ac.AsyncClient, name))
        assert list(sync.parameters) == list(asyn.parameters)
    assert inspect.signature(ac.Client).parameters.keys() == \
        inspect.signature(ac.AsyncClient).parameters.keys()
    assert inspect.iscoroutinefunction(ac.AsyncClient.activate)


def test_default_timeouts_and_retries():
    core = ClientCore()
    assert core.base_url == ac.DEFAULT_BASE_URL
    assert core.timeout == ac.DEFAULT_TIMEOUT_S and core.retry.max_retries == ac.DEFAULT_MAX_RETRIES
    opts = core.http_options()
    assert opts["timeout"].connect == ac.DEFAULT_CONNECT_TIMEOUT_S
    assert "Authorization" not in opts["headers"]
    assert ClientCore(api_key="k").http_options()["headers"]["Authorization"] == "Bearer k"
    call = core.activate_call("relu", [1.0], timeout=2.0)
    assert core.http_timeout(call).read == 2.0 + 1.0  # the deadline plus a grace second
    assert json.loads(call.request.content[: int(
        call.request.headers[_protocol.V2_HEADER_LENGTH])])["parameters"]["timeout"] == 2_000_000
