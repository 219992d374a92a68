"""The Python client against a real server: numpy, torch and lists, every dtype, every wire
format, 0-d and empty arrays; each result equal to the local reference bit for bit (JSON
formats: value for value, NaN for NaN, since JSON has one NaN)."""

from __future__ import annotations

import asyncio

import actserve_client as ac
import ml_dtypes
import numpy as np
import pytest
import torch
from actserve_client import AsyncClient, Client
from actserve_client import _arrays as client_arrays

from .conftest import reference, same_bits

DTYPES = ("float16", "bfloat16", "float32", "float64")
BINARY = ("v2", "native")
SHAPES = [(), (0,), (2, 0, 3), (7,), (3, 5), (2, 3, 4), (1, 1, 1, 9)]
CASES = [  # activation, params
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("mish", {}),
    ("softplus", {"beta": 2.0, "threshold": 5.0}),
    ("elu", {"alpha": 0.5}),
    ("sigmoid", {}),
]
SPECIAL = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -3e38, 65504.0, 1e-7, -1e-5]


def values(shape, seed: int) -> np.ndarray:
    """float64 values for ``shape``: normals, with the awkward values mixed in."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(int(np.prod(shape, dtype=np.int64))) * 4
    v[: len(SPECIAL)] = SPECIAL[: v.size]
    rng.shuffle(v)
    return v.reshape(shape)


def as_numpy(v: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        if dtype == "bfloat16":
            return v.astype(np.float32).astype(ml_dtypes.bfloat16)
        return v.astype(dtype)


def storage(a) -> np.ndarray:
    """Wire storage of a numpy array or tensor (bfloat16 as uint16 bits)."""
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).numpy().view("<u2")
        return a.numpy()
    if a.dtype.name == "bfloat16":
        return a.view("<u2")
    return a


def widened(store: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (store.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return store.astype(np.float64)


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal values, NaN where NaN, and the sign of every zero."""
    return (got.shape == want.shape and np.array_equal(got, want, equal_nan=True)
            and np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)])))


def check(result_store: np.ndarray, expected: np.ndarray, dtype: str, protocol: str) -> None:
    if protocol in BINARY:
        assert same_bits(result_store, expected)
    else:
        assert same_values(widened(result_store, dtype), widened(expected, dtype))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


@pytest.mark.parametrize("protocol", ac.PROTOCOLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_round_trip(client, protocol, dtype):
    for i, shape in enumerate(SHAPES):
        name, params = CASES[i % len(CASES)]
        x = as_numpy(values(shape, i), dtype)
        if protocol == "v2-json" and dtype in ("float16", "bfloat16"):
            with pytest.raises(ac.InvalidInputError, match="binary"):
                client.activate(name, x, protocol=protocol, **params)
            continue
        y = client.activate(name, x, protocol=protocol, **params)
        assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == x.dtype
        expected, out_dtype = reference(name, storage(x), dtype, params=params)
        assert out_dtype == dtype
        check(storage(y), expected, dtype, protocol)
        assert y.flags.writeable


@pytest.mark.parametrize("protocol", ac.PROTOCOLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_round_trip(client, protocol, dtype):
    tdtype = getattr(torch, dtype)
    for i, shape in enumerate(SHAPES):
        name, params = CASES[(i + 3) % len(CASES)]
        with np.errstate(over="ignore"):
            t = torch.from_numpy(values(shape, 100 + i)).to(tdtype)
        if i % 2:  # a non-contiguous view travels as its values
            t = t.transpose(0, -1) if t.ndim > 1 else t.flip(0)
        if protocol == "v2-json" and dtype in ("float16", "bfloat16"):
            with pytest.raises(ac.InvalidInputError):
                client.activate(name, t, protocol=protocol, **params)
            continue
        y = client.activate(name, t, protocol=protocol, **params)
        assert isinstance(y, torch.Tensor) and y.shape == t.shape and y.dtype == t.dtype
        expected, _ = reference(name, storage(t.contiguous()), dtype, params=params)
        check(storage(y), expected, dtype, protocol)


@pytest.mark.parametrize("protocol", ac.PROTOCOLS)
def test_list_round_trip(client, protocol):
    """Lists travel as float32 and come back as lists of the same nesting."""
    for i, shape in enumerate(SHAPES):
        name, params = CASES[(i + 5) % len(CASES)]
        x32 = values(shape, 200 + i).astype(np.float32)
        data = x32.tolist()
        y = client.activate(name, data, protocol=protocol, **params)
        expected, _ = reference(name, x32, "float32", params=params)
        if shape == ():
            assert isinstance(y, float)
        else:
            assert isinstance(y, list) and np.asarray(y).shape == np.asarray(data).shape
        got = np.asarray(y, dtype=np.float64)
        expected = expected.reshape(got.shape)  # [[], []] cannot say (2, 0, 3)
        assert same_values(got, expected.astype(np.float64))
        if protocol in BINARY:
            assert same_bits(got.astype(np.float32), expected)


def test_numbers_and_numpy_scalars(client):
    assert client.activate("relu", -2) == 0.0
    assert client.activate("hardtanh", 3.5, min_val=-2.0, max_val=2.0) == 2.0
    y = client.activate("sigmoid", np.float64(0.25))
    assert isinstance(y, np.float64)
    assert same_bits(np.asarray(y), reference("sigmoid", np.asarray(0.25), "float64")[0])
    z = client.activate("tanh", np.float16(1.5))
    assert isinstance(z, np.float16)


@pytest.mark.parametrize("compute", ["float16", "bfloat16", "float64", np.float16, torch.float64])
@pytest.mark.parametrize("protocol", ["v2", "native", "native-json"])
def test_compute_dtype_sets_the_result_dtype(client, compute, protocol):
    name = client_arrays.dtype_name(compute)
    x = values((4, 6), 7).astype(np.float32)
    y = client.activate("gelu", x, compute_dtype=compute, protocol=protocol)
    expected, out = reference("gelu", x, "float32", compute_dtype=name)
    assert out == name and y.dtype.name == name
    check(storage(y), expected, name, protocol)
    t = client.activate("gelu", torch.from_numpy(x), compute_dtype=compute, protocol=protocol)
    assert str(t.dtype) == f"torch.{name}"
    check(storage(t), expected, name, protocol)


def test_v2_json_refuses_a_16_bit_result(client):
    with pytest.raises(ac.BadRequestError, match="binary"):
        client.activate("relu", [1.0], compute_dtype="float16", protocol="v2-json")


@pytest.mark.parametrize("inplace", [False, True])
def test_amp_and_inplace(client, inplace):
    x = values((5, 5), 9).astype(np.float32)
    for name in ("silu", "tanh", "elu"):
        y = client.activate(name, x, amp=True, inplace=inplace)
        expected, out = reference(name, x, "float32", amp=True, inplace=inplace)
        assert y.dtype.name == out
        assert same_bits(storage(y), expected)
    with pytest.raises(ac.BadRequestError, match="in-place"):
        client.activate("gelu", x, inplace=True)


def test_bfloat16_without_ml_dtypes_comes_back_as_exact_float32(client, monkeypatch):
    monkeypatch.setattr(client_arrays, "_BF16", [None])
    x = values((3, 4), 11).astype(np.float32)
    y = client.activate("sigmoid", x, compute_dtype="bfloat16")
    expected, _ = reference("sigmoid", x, "float32", compute_dtype="bfloat16")
    assert y.dtype == np.float32
    assert same_values(y.astype(np.float64), widened(expected, "bfloat16"))


def test_the_callers_array_is_never_modified(client):
    x = values((64,), 13).astype(np.float32)
    before = x.copy()
    client.activate("relu", x, inplace=True)
    assert same_bits(x, before)
    t = torch.from_numpy(before.copy())
    client.activate("relu", t, inplace=True)
    assert same_bits(t.numpy(), before)


def test_big_endian_and_non_contiguous_numpy(client):
    x = values((6, 8), 17)
    be = x.astype(">f4")[:, ::2]
    y = client.activate("mish", be)
    want = np.ascontiguousarray(x.astype("<f4")[:, ::2])
    assert y.dtype == np.dtype("<f4") and y.shape == (6, 4)
    assert same_bits(y, reference("mish", want, "float32")[0])


def test_activate_many_keeps_order_and_bits(client):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(rng.integers(0, 300)).astype(np.float32) for _ in range(40)]
    ys = client.activate_many("gelu", xs, concurrency=6)
    assert len(ys) == len(xs)
    for x, y in zip(xs, ys, strict=True):
        assert same_bits(y, reference("gelu", x, "float32")[0])
    assert client.activate_many("relu", []) == []
    mixed = [[1.0, -1.0], torch.tensor([-2.0]), np.array([3.0], dtype=np.float16)]
    out = client.activate_many("relu", mixed, protocol="native")
    assert out[0] == [1.0, 0.0] and out[1].tolist() == [0.0] and out[2].dtype == np.float16


def test_activate_many_raises_the_first_error(client):
    xs = [np.ones(3, np.float32), np.arange(3), np.ones(3, np.float32)]
    with pytest.raises(ac.InvalidInputError, match="int64"):
        client.activate_many("relu", xs, concurrency=2)
    with pytest.raises(ValueError, match="concurrency"):
        client.activate_many("relu", xs, concurrency=0)


def test_async_client_round_trips(server):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((rng.integers(0, 9), 3)).astype(np.float16) for _ in range(24)]

    async def run():
        async with AsyncClient(server.url) as c:
            await c.wait_until_ready(30)
            assert await c.health() and await c.ready()
            one = await c.activate("leaky_relu", xs[0], negative_slope=0.3)
            many = await c.activate_many("softsign", xs, concurrency=5)
            lst = await c.activate("relu", [[-1.0, 2.0]], protocol="native-json")
            cat = await c.activations()
            stats = await c.stats()
            return one, many, lst, cat, stats

    one, many, lst, cat, stats = asyncio.run(run())
    assert same_bits(one, reference("leaky_relu", xs[0], "float16",
                                    params={"negative_slope": 0.3})[0])
    for x, y in zip(xs, many, strict=True):
        assert y.dtype == np.float16 and same_bits(y, reference("softsign", x, "float16")[0])
    assert lst == [[0.0, 2.0]]
    assert "softsign" in cat and stats["ready"] is True


def test_catalogue_health_ready_and_stats(client):
    cat = client.activations()
    assert {"relu", "leaky_relu", "gelu", "hardtanh"} <= set(cat)
    leaky = cat["leaky_relu"]
    assert isinstance(leaky, ac.ActivationInfo)
    assert leaky.param_names == ("negative_slope",) and leaky.inplace
    assert leaky.params[0]["default"] == 0.01
    assert cat["gelu"].inplace is False
    assert client.health() is True and client.ready() is True
    client.wait_until_ready(5)
    client.activate("relu", [1.0])
    stats = client.stats()
    assert stats["ready"] is True and "relu" in stats["activations"]


def test_client_repr_and_context_manager(server):
    c = Client(server.url + "/", protocol="native")
    assert repr(c) == f"Client({server.url!r}, protocol='native')"
    with c:
        assert c.activate("relu", [2.0]) == [2.0]
    assert c.is_closed
    with pytest.raises(RuntimeError):
        c.activate("relu", [2.0])
