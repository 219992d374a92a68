"""The second adversarial review (docs/reliability.md, "review 2" rows), one test or more per
finding: client numbers and strings checked at the edge, bounded state under a flood, shared
memory only of the server's own user and scoped per API key, every POST route closed to
browser-simple types, a stalled registration body timed out, stale files of a killed server
swept without touching a client's, and a request's working set bounded by admission.
Real servers on 127.0.0.1; raw sockets where an HTTP client would hide the behaviour."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.engine.ipc import arena
from service.process import rundir

from .conftest import serve, subprocess_server
from .test_hardening import HealthProbe, _connect, _response

JSON = {"content-type": "application/json"}
BIN = {"content-type": "application/octet-stream"}
HUGE = int("9" * 400)  # a 400-digit integer: valid JSON, beyond any float


def _raw(text: str) -> bytes:
    """A JSON body written by hand (escapes such as a lone ``\\ud800`` kept as written)."""
    return text.encode()


# -- finding 1: lone surrogates and control characters ----------------------------------------
LONE = r'{"name":"s","expr":"a*x","params":{"a":{"default":1,"doc":"\ud800"}}}'


@pytest.mark.parametrize("doc", [r"\ud800", r"\udfff", r"x\udc00y", r"\ud800\ud800", r"\u0007",
                                 r"line\nbreak"])
def test_a_registration_with_a_lone_surrogate_or_control_character_is_a_400(client, doc):
    body = LONE.replace(r"\ud800", doc)
    r = client.post("/v1/activations", content=_raw(body), headers=JSON)
    assert r.status_code == 400, r.text[:300]
    assert "doc" in r.json()["error"]["message"]
    assert client.get("/v1/activations").status_code == 200  # nothing half-registered
    assert client.get("/v1/activations/s").status_code == 404


def test_a_surrogate_pair_is_a_character_and_is_served(client):
    body = LONE.replace(r"\ud800", r"smile \ud83d\ude00")
    r = client.post("/v1/activations", content=_raw(body), headers=JSON)
    try:
        assert r.status_code == 201, r.text[:300]
        got = client.get("/v1/activations/s")
        assert got.status_code == 200
        assert got.json()["params"][0]["doc"] == "smile \N{GRINNING FACE}"
        assert client.get("/v1/activations").status_code == 200
    finally:
        client.delete("/v1/activations/s")


@pytest.mark.parametrize("where", ["native dtype", "v2 id", "v2 output name", "v2 parameter key"])
def test_lone_surrogates_anywhere_in_an_inference_body_are_a_400(client, where):
    if where == "native dtype":
        path, body = "/v1/activations/relu", r'{"data":[1.0],"dtype":"\ud800"}'
    elif where == "v2 id":
        path = "/v2/models/relu/infer"
        body = (r'{"id":"\ud800","inputs":[{"name":"input","shape":[1],"datatype":"FP32",'
                r'"data":[1.0]}]}')
    elif where == "v2 output name":
        path = "/v2/models/relu/infer"
        body = (r'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1.0]}],'
                r'"outputs":[{"name":"\udfff"}]}')
    else:
        path = "/v2/models/relu/infer"
        body = (r'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1.0]}],'
                r'"parameters":{"\ud800":1}}')
    r = client.post(path, content=_raw(body), headers=JSON)
    assert r.status_code == 400, r.text[:300]
    assert "surrogate" in r.text


# -- finding 2: inline expressions cannot grow the capability table ---------------------------
def test_inline_expressions_capability_rows_are_bounded_by_the_inline_cache():
    """Each expression's unsupported rows are forgotten when the inline cache evicts it, and
    the catalogue lists no inline rows at all (its size is independent of history)."""
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        srv.engine.expressions.max_entries = 4
        before = c.get("/v1/activations").json()["unsupported"]
        for i in range(24):
            r = c.post("/v1/activations/expr", json={"data": [1.0, 2.0], "expr": f"x*{i}.5+2"})
            assert r.status_code == 200, r.text[:200]
        caps = srv.engine.capabilities
        inline = {k[0] for k in caps.failures(everything=True) if k[0].startswith("expr:")}
        assert 0 < len(inline) <= 4, inline  # only the cached expressions' rows remain
        after = c.get("/v1/activations").json()["unsupported"]
        assert after == before


def test_a_flood_of_new_inline_expressions_keeps_the_catalogue_and_healthz_fast():
    """The review's flood (4 clients, a new expression each request), for 3 s against a
    server process: the catalogue stays the size it had, and /healthz answers under 100 ms
    throughout, catalogue GETs included."""
    with subprocess_server() as (_, url), httpx.Client(base_url=url, timeout=60) as c:
        base = c.get("/v1/activations")
        base_rows = len(base.json()["unsupported"])
        counter = itertools.count()
        stop = time.monotonic() + 3.0
        statuses: list[int] = []

        def flood() -> None:
            with httpx.Client(base_url=url, timeout=30) as fc:
                while time.monotonic() < stop:
                    i = next(counter)
                    expr = f"x*{i}.{i % 7}+2" if i % 10 else None
                    if expr is None:  # a catalogue GET among the expressions
                        statuses.append(fc.get("/v1/activations").status_code)
                        continue
                    r = fc.post("/v1/activations/expr", json={"data": [1.0], "expr": expr})
                    statuses.append(r.status_code)

        with HealthProbe(url) as probe, concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: flood(), range(4)))
        after = c.get("/v1/activations")
    print(f"\ninline flood: {len(statuses)} requests; /healthz worst {probe.worst_ms:.1f} ms")
    assert statuses and set(statuses) == {200}
    assert len(after.json()["unsupported"]) == base_rows
    assert len(after.content) <= len(base.content) * 1.05
    assert probe.failures == 0 and probe.worst_ms < 100, probe.latencies


# -- finding 3: overflowing integers ---------------------------------------------------------
def _v2(**extra) -> dict:
    return {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            **extra}


OVERFLOWS = [
    ("/v1/activations/relu", {"data": [1.0], "priority": HUGE}, "priority"),
    ("/v1/activations/relu", {"data": [1.0], "timeout": HUGE}, "timeout"),
    ("/v1/activations/leaky_relu", {"data": [1.0], "params": {"negative_slope": HUGE}},
     "negative_slope"),
    ("/v2/models/relu/infer", _v2(parameters={"priority": HUGE}), "priority"),
    ("/v2/models/relu/infer", _v2(parameters={"timeout": HUGE}), "timeout"),
    ("/v2/models/leaky_relu/infer", _v2(parameters={"negative_slope": -HUGE}), "negative_slope"),
    ("/v1/activations", {"name": "big", "expr": "a*x", "params": {"a": {"default": HUGE}}},
     "default"),
    ("/v1/activations", {"name": "big", "expr": "a*x", "params": {"a": HUGE}}, "default"),
    ("/v1/activations", {"name": "big", "expr": "a*x", "params": {"a": {"default": 1,
                                                                          "max": HUGE}}}, "max"),
    ("/v1/activations", {"name": "big", "expr": "x", "batch_norm": {
        "running_mean": [HUGE], "running_var": [1.0]}}, "running_mean"),
    ("/v1/activations", {"name": "big", "expr": "x", "batch_norm": {
        "running_mean": [0.0], "running_var": [1.0], "eps": HUGE}}, "eps"),
]


@pytest.mark.parametrize(("path", "obj", "field"), OVERFLOWS,
                         ids=[f"{c[2]}@{c[0][:4]}{i}" for i, c in enumerate(OVERFLOWS)])
def test_a_400_digit_integer_is_a_400_naming_the_field(client, path, obj, field):
    r = client.post(path, content=json.dumps(obj).encode(), headers=JSON)
    assert r.status_code == 400, r.text[:300]
    assert field in r.text and len(r.text) < 800
    assert client.get("/v1/activations/big").status_code == 404


def test_a_400_digit_integer_in_the_query_string_is_a_400(client):
    x = np.ones(1, np.float32).tobytes()
    for query in ({"priority": "9" * 400}, {"timeout": "9" * 400},
                  {"negative_slope": "9" * 400}):
        r = client.post("/v1/activations/leaky_relu", params={"shape": "1", **query},
                        content=x, headers=BIN)
        assert r.status_code == 400, (query.keys(), r.text[:300])


# -- finding 5: a stalled registration body --------------------------------------------------
def test_a_stalled_registration_body_gets_408():
    with serve(body_timeout_s=1.0) as srv:
        s = _connect(srv.url)
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/activations HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 16000\r\n\r\n{")
        status, _ = _response(s, timeout=15)
        took = time.perf_counter() - t0
        s.close()
    assert status == 408
    assert took < 5.0, took


def test_a_registration_over_its_size_is_a_413_before_it_is_read(client):
    r = client.post("/v1/activations", content=b"{" + b" " * 20000 + b"}", headers=JSON)
    assert r.status_code == 413


# -- finding 6: shared memory of the server's own user, scoped per API key -------------------
_keys = itertools.count()


def _shm_key() -> str:
    return f"actserve-h2test-{os.getpid()}-{next(_keys)}"


@pytest.fixture()
def shm_object():
    made = []

    def make(size: int = 64, owner: int | None = None, mode: int = 0o600) -> str:
        key = _shm_key()
        path = Path("/dev/shm") / key
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        os.ftruncate(fd, size)
        os.pwrite(fd, b"secret!!" * (size // 8), 0)
        if owner is not None:
            os.fchown(fd, owner, owner)
        os.close(fd)
        made.append(path)
        return key

    yield make
    for path in made:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make an object another user owns")
def test_an_object_of_another_user_cannot_be_registered(client, shm_object):
    key = shm_object(64, owner=65534)
    before = (Path("/dev/shm") / key).read_bytes()
    r = client.post("/v2/systemsharedmemory/region/other/register", headers=JSON,
                    json={"key": key, "offset": 0, "byte_size": 64})
    assert r.status_code == 400 and "owned by" in r.json()["error"]
    assert client.get("/v2/systemsharedmemory/status").json() == []
    assert (Path("/dev/shm") / key).read_bytes() == before


def _infer_from(c: httpx.Client, region: str, headers: dict) -> httpx.Response:
    return c.post("/v2/models/relu/infer", headers={**JSON, **headers}, json={
        "inputs": [{"name": "input", "shape": [4], "datatype": "FP32",
                    "parameters": {"shared_memory_region": region,
                                   "shared_memory_byte_size": 16}}]})


def test_regions_are_scoped_to_the_api_key_that_registered_them(shm_object):
    key = shm_object(64)
    np.arange(16, dtype=np.float32).tofile(Path("/dev/shm") / key)
    one = {"authorization": "Bearer k1"}
    two = {"authorization": "Bearer k2"}
    with serve(api_keys="k1,k2") as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/v2/systemsharedmemory/region/r/register", headers={**JSON, **one},
                   json={"key": key, "byte_size": 64})
        assert r.status_code == 200, r.text
        assert [x["name"] for x in c.get("/v2/systemsharedmemory/status",
                                         headers=one).json()] == ["r"]
        assert c.get("/v2/systemsharedmemory/status", headers=two).json() == []
        assert c.get("/v2/systemsharedmemory/region/r/status", headers=two).status_code == 404
        r = _infer_from(c, "r", two)
        assert r.status_code == 400 and "not registered" in r.json()["error"]
        assert c.post("/v2/systemsharedmemory/unregister", headers={**JSON, **two}
                      ).status_code == 200  # another key's "all" is its own, none here
        assert c.post("/v2/systemsharedmemory/region/r/unregister", headers={**JSON, **two}
                      ).status_code == 404
        r = _infer_from(c, "r", one)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0.0, 1.0, 2.0, 3.0]
        # the same name under another key is another region
        r = c.post("/v2/systemsharedmemory/region/r/register", headers={**JSON, **two},
                   json={"key": key, "offset": 16, "byte_size": 16})
        assert r.status_code == 200, r.text
        assert _infer_from(c, "r", two).json()["outputs"][0]["data"] == [4.0, 5.0, 6.0, 7.0]
        assert _infer_from(c, "r", one).json()["outputs"][0]["data"] == [0.0, 1.0, 2.0, 3.0]


def test_regions_are_bounded_per_key_under_a_flood(shm_object):
    """Two keys register regions as fast as they can: each gets its own MAX_REGIONS, the
    rest are 400s, and /healthz stays under 100 ms meanwhile."""
    from service.codecs.shm_regions import MAX_REGIONS

    key = shm_object(64)
    with subprocess_server({"ACTSERVE_API_KEYS": "k1,k2"}) as (_, url):
        def flood(token: str) -> list[int]:
            with httpx.Client(base_url=url, timeout=30,
                              headers={"authorization": f"Bearer {token}"}) as c:
                return [c.post(f"/v2/systemsharedmemory/region/r{i}/register", headers=JSON,
                               json={"key": key, "byte_size": 64}).status_code
                        for i in range(MAX_REGIONS + 20)]

        with HealthProbe(url) as probe, concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(flood, ["k1", "k2"]))
        with httpx.Client(base_url=url, headers={"authorization": "Bearer k1"}) as c:
            mine = c.get("/v2/systemsharedmemory/status").json()
    for statuses in answers:
        assert statuses.count(200) == MAX_REGIONS and statuses.count(400) == 20
    assert len(mine) == MAX_REGIONS
    print(f"\nregion flood: /healthz worst {probe.worst_ms:.1f} ms over "
          f"{len(probe.latencies)} probes")
    assert probe.failures == 0 and probe.worst_ms < 100, probe.latencies


# -- finding 7: browser-simple types on every POST route -------------------------------------
SIMPLE = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")


def test_every_post_route_refuses_browser_simple_types(server, shm_object):
    """Walks the app's route table (its OpenAPI paths): each POST route answers 415 to each
    simple type, and a region registered before is still there after the attempts to
    unregister it."""
    key = shm_object(64)
    routes = [path for path, ops in server.app.openapi()["paths"].items() if "post" in ops]
    assert len(routes) >= 10, routes
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v2/systemsharedmemory/region/keep/register", headers=JSON,
                      json={"key": key, "byte_size": 64}).status_code == 200
        try:
            for route in routes:
                path = route.format(name="relu", version="1")
                body = json.dumps({"key": key, "byte_size": 64, "data": [1.0]}).encode()
                for ctype in SIMPLE:
                    r = c.post(path, content=body, headers={"content-type": ctype})
                    assert r.status_code == 415, (path, ctype, r.status_code, r.text[:200])
            status = c.get("/v2/systemsharedmemory/status").json()
            assert [s["name"] for s in status] == ["keep"]
        finally:
            c.post("/v2/systemsharedmemory/unregister")


# -- findings 8 and 9: stale files of a killed server, and a client's ----------------------------
def _dead_pid() -> int:
    for pid in range(999_999, 900_000, -1):
        if not arena.pid_alive(pid):
            return pid
    raise AssertionError("no free pid")


def test_the_arena_sweep_skips_what_it_cannot_unlink_and_removes_stale_arenas():
    pid = _dead_pid()
    stale_dir = Path("/dev/shm") / f"actserve-{pid}-deadbee1"  # a killed supervisor's run dir
    stale_arena = Path("/dev/shm") / f"actserve-{pid}-deadbee2"
    stale_dir.mkdir()
    (stale_dir / "ready").write_bytes(b"\0")
    stale_arena.write_bytes(b"\0" * 64)
    try:
        removed = arena.sweep_stale()  # raised IsADirectoryError
        assert stale_arena.name in removed and not stale_arena.exists()
        assert stale_dir.name not in removed  # not an arena: the supervisor's clean-up's
    finally:
        shutil.rmtree(stale_dir, ignore_errors=True)
        stale_arena.unlink(missing_ok=True)


def test_the_process_engine_starts_after_a_killed_supervisor_left_its_run_dir():
    stale_dir = Path("/dev/shm") / f"actserve-{_dead_pid()}-deadbee3"
    stale_dir.mkdir()
    (stale_dir / "snap").mkdir()
    try:
        with subprocess_server({"ACTSERVE_ENGINE": "process"}) as (_, url):
            r = httpx.post(url + "/v1/activations/relu", json={"data": [-1.0, 2.0]})
            assert r.status_code == 200 and r.json()["data"] == [0.0, 2.0]
    finally:
        shutil.rmtree(stale_dir, ignore_errors=True)


def test_the_run_dir_clean_up_removes_only_names_the_server_made():
    pid = _dead_pid()
    base = Path("/dev/shm")
    client_names = [f"actserve-{pid}-deadbeef-1", f"actserve-{pid}-deadbeef_x",
                    f"actserve-{pid}-deadbeef.tmp"]
    for name in client_names:
        (base / name).write_bytes(b"client data")
    ours = base / f"actserve-{pid}-deadbee4"
    ours.mkdir()
    (ours / "ready").write_bytes(b"\0")
    try:
        removed = rundir.clean_stale(base)
        assert ours.name in removed and not ours.exists()
        for name in client_names:
            assert (base / name).read_bytes() == b"client data", name
            assert name not in removed
    finally:
        for name in client_names:
            (base / name).unlink(missing_ok=True)
        shutil.rmtree(ours, ignore_errors=True)


# -- finding 10: a request's working set is bounded by admission ----------------------------
DEEP30 = "x" + "*1.0001+0.0001" * 15  # 30 tensor operations
TERMS20 = " + ".join(f"sin(x*{i}.5)" for i in range(10))  # 10 sin and 30 other ops


def test_a_request_whose_working_set_is_too_large_is_a_413_and_a_small_one_is_not_stuck():
    x16 = np.linspace(-1, 1, 4 * 1024 * 1024, dtype=np.float32)  # 16 MiB
    x8 = np.linspace(-1, 1, 4 * 1024 * 1024, dtype=np.float16)  # 8 MiB
    with serve() as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        done = threading.Event()
        small: list[float] = []

        def relu_meanwhile() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                r = c.post("/v1/activations/relu", json={"data": [-1.0, 1.0]})
                assert r.status_code == 200
                small.append(time.perf_counter() - t0)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(relu_meanwhile)
            big = c.post("/v1/activations/expr", content=x16.tobytes(), headers=BIN, params={
                "shape": str(x16.size), "expr": DEEP30, "outputs": "value,grad",
                "compute_dtype": "float64"})
            report = c.post("/v1/activations/expr", content=x8.tobytes(), headers=BIN, params={
                "shape": str(x8.size), "dtype": "float16", "expr": TERMS20,
                "report": "numerics"})
            done.set()
            waiter.result()
        for r in (big, report):
            assert r.status_code == 413, r.text[:300]
            assert "working set" in r.text and "max_batch_elements" in r.text
        assert max(small) < 1.0, small
        # within the bound: served, and a lone answer equals the same request alone
        x = np.linspace(-1, 1, 65536, dtype=np.float32)
        r = c.post("/v1/activations/expr", content=x.tobytes(), headers=BIN, params={
            "shape": str(x.size), "expr": DEEP30, "outputs": "value,grad",
            "compute_dtype": "float64"})
        assert r.status_code == 200, r.text[:300]


def test_the_working_set_bound_scales_with_max_batch_elements():
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    with serve(max_batch_elements=4096) as srv, httpx.Client(base_url=srv.url) as c:
        plain = c.post("/v1/activations/relu", content=x.tobytes(), headers=BIN,
                       params={"shape": "4096"})
        assert plain.status_code == 200  # a full plain batch always fits
        r = c.post("/v1/activations/expr", content=x.tobytes(), headers=BIN, params={
            "shape": "4096", "expr": DEEP30, "outputs": "value,grad", "compute_dtype": "float64",
            "report": "numerics"})
        assert r.status_code == 413 and "working set" in r.text
        r = c.post("/v1/activations/relu", content=x[:1024].tobytes(), headers=BIN, params={
            "shape": "1024", "outputs": "value,grad", "report": "numerics"})
        assert r.status_code == 200, r.text[:300]


# -- findings 11 and 12: batch-norm layers ---------------------------------------------------
BN = {"name": "bnl", "expr": "relu(x)", "batch_norm": {"running_mean": [0.5, -0.5],
                                                        "running_var": [1.0, 2.0]}}


@pytest.fixture()
def bn_layer(client):
    assert client.post("/v1/activations", json=BN).status_code == 201
    yield "bnl"
    client.delete("/v1/activations/bnl")


def test_batch_statistics_of_one_value_per_channel_is_a_400_naming_the_rule(client, bn_layer):
    r = client.post("/v1/activations/bnl", json={"data": [[1, 2]], "params": {"batch_stats": True}})
    assert r.status_code == 400, r.text[:300]
    assert "more than one value per channel" in r.json()["error"]["message"]
    r = client.post("/v1/activations/bnl", json={"data": [[1, 2], [3, 5]],
                                                  "params": {"batch_stats": True}})
    assert r.status_code == 200
    assert client.post("/v1/activations/bnl", json={"data": [[1, 2]]}).status_code == 200


def test_the_accuracy_table_of_a_batch_norm_layer(client, bn_layer):
    r = client.get("/v1/activations/bnl/accuracy")
    assert r.status_code == 200, r.text[:300]
    rows = r.json()["rows"]
    assert rows and any("max_ulp_error" in row for row in rows)


# -- finding 14: reserved names and whole-name matches -------------------------------------------
@pytest.mark.parametrize("name", ["stats", "expr"])
def test_names_the_routes_reserve_cannot_be_registered(client, name):
    r = client.post("/v1/activations", json={"name": name, "expr": "x"})
    assert r.status_code == 409, r.text[:300]
    assert "reserved" in r.json()["error"]["message"]
    assert "model_stats" in client.get("/v2/models/stats").json()


@pytest.mark.parametrize("name", ["nl%0A", "nl%0D", "tab%09"])
def test_region_names_with_a_line_end_are_refused(client, shm_object, name):
    key = shm_object(64)
    r = client.post(f"/v2/systemsharedmemory/region/{name}/register", headers=JSON,
                    json={"key": key, "byte_size": 64})
    assert r.status_code == 400, r.text[:300]
    r = client.post("/v2/systemsharedmemory/region/ok/register", headers=JSON,
                    json={"key": key + "\n", "byte_size": 64})
    assert r.status_code == 400
    assert client.get("/v2/systemsharedmemory/status").json() == []


# -- registrations are bounded ---------------------------------------------------------------
def test_custom_registrations_are_bounded(monkeypatch):
    from service.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_CUSTOM", 3)
    with serve() as srv, httpx.Client(base_url=srv.url) as c:
        for i in range(3):
            assert c.post("/v1/activations", json={"name": f"c{i}", "expr": "x"}
                          ).status_code == 201
        r = c.post("/v1/activations", json={"name": "c3", "expr": "x"})
        assert r.status_code == 400 and "at most 3" in r.text
        assert c.delete("/v1/activations/c0").status_code == 204
        assert c.post("/v1/activations", json={"name": "c3", "expr": "x"}).status_code == 201
