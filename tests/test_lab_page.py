"""``/lab``, the lab page, in a real headless Chromium driven over the Chrome DevTools
Protocol (a websocket; no test tool with a browser of its own): it loads with no console
errors, the article's comparison plots exactly the API's answers, an invalid expression
shows the server's message, the accuracy map has a cell per activation x dtype x AMP, the
error and cost views measure, and registering from the page makes the activation callable.
It works with several workers, the engine process and API keys.

Each view's screenshot is written to ``loadtest/reports/lab-page/`` (git-ignored). Without
Chromium the browser tests skip locally; in CI (``CI=true``) they fail instead."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import ROOT, serve, subprocess_server
from tests.test_docs_pages import _chromium  # one way to find the browser for every page test

SHOTS = ROOT / "loadtest" / "reports" / "lab-page"
ARTICLE = ["relu", "leaky_relu", "sigmoid", "tanh", "elu", "relu_sigmoid"]
KEY = "lab-test-key"


class Browser:
    """One headless Chromium and one page, driven over the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="lab-chromium-")
        self.stack = contextlib.ExitStack()
        self.log = self.stack.enter_context(open(Path(self.profile) / "chromium.log", "w"))  # noqa: SIM115
        self.proc = subprocess.Popen(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1280,1000", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start: "
                                   + (Path(self.profile) / "chromium.log").read_text()[-2000:])
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = self.stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20))
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000,
                  deviceScaleFactor=1, mobile=False)

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        mid = next(self.ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expression: str, timeout: float = 60):
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll ``expression`` until it is truthy (its value), failing after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}; console: "
                                     f"{self.console_errors()}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:500])
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                entry = p["entry"]
                out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        return out

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        height = self.eval("document.documentElement.scrollHeight")
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1280, "height": max(600, height),
                               "scale": 1})
        path = SHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stack.close()  # the websocket and the log
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def lab_server():
    with serve(allow_profile=True) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:  # warm: the first gradient
            c.post("/v1/activations/relu", json={"data": [1.0], "outputs": ["value", "grad"]})
        yield srv


def _load(browser: Browser, url: str) -> None:
    browser.open(url + "/lab")
    browser.wait_for("document.body.dataset.ready === '1' && lab.state.plots >= 1")


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _same(a: list, b: list) -> bool:
    """Equal element by element; the page's NaN / Inf come back as null."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(y, float) and not math.isfinite(y):
            if x is not None and not (isinstance(x, float) and (x == y or math.isnan(x))):
                return False
        elif x != y:
            return False
    return True


def _check_article(browser: Browser, url: str, headers: dict | None = None) -> None:
    """Click the article's comparison: six curves, each equal to the API's answer."""
    before = browser.eval("lab.state.plots")
    browser.eval("document.getElementById('article').click()")
    browser.wait_for(f"lab.state.plots > {before}")
    curves = browser.eval("lab.state.curves")
    drawn = browser.eval("({y: lab.charts.y.data, dy: lab.charts.dy.data})")
    assert [c["activation"] for c in curves] == ARTICLE
    assert browser.eval("document.getElementById('chart-y').dataset.series") == "6"
    assert len(drawn["y"]) == 7 and len(drawn["dy"]) == 7  # x and six series
    with httpx.Client(base_url=url, timeout=60, headers=headers or {}) as client:
        for i, curve in enumerate(curves):
            answer = _post(client, curve["path"], curve["request"])
            assert curve["request"]["outputs"] == ["value", "grad"]
            assert len(curve["x"]) > 100 and curve["request"]["data"] == curve["x"]
            assert _same(curve["y"], answer["data"]), curve["activation"]
            assert _same(curve["dy"], answer["grad"]), curve["activation"]
            assert _same(drawn["y"][i + 1], answer["data"])  # what uPlot draws
            assert _same(drawn["dy"][i + 1], answer["grad"])
            assert drawn["y"][0] == curve["x"]


# -- without a browser ------------------------------------------------------------------
def test_page_headers_assets_and_weight(lab_server):
    with httpx.Client(base_url=lab_server.url, timeout=30) as client:
        page = client.get("/lab")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                          "object-src 'none'", "frame-ancestors 'none'"):
            assert directive in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)  # no inline script
        assert "<style" not in html and not re.search(r"\sstyle=", html)
        assert not re.search(r"\son[a-z]+=", html)  # no inline handlers
        urls = re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", html)
        assets = [u for u in urls if u.startswith("/lab-assets/")]
        assert len(assets) == 4, urls
        weight = len(page.content)
        for url in assets:
            r = client.get(url)
            assert r.status_code == 200 and r.content, url
            assert r.headers["x-content-type-options"] == "nosniff"
            weight += len(r.content)
        js = client.get("/lab-assets/lab.js")
        assert "javascript" in js.headers["content-type"]
        assert client.get("/lab-assets/vendor/uPlot.LICENSE").status_code == 200
        assert client.get("/lab-assets/../app.py").status_code == 404
        assert client.post("/lab").status_code == 405
        assert weight < 150_000, weight  # HTML + JS + CSS, uPlot included
        # linked from /docs (the OpenAPI description Swagger UI shows)
        assert "(/lab)" in client.get("/openapi.json").json()["info"]["description"]
        assert "/lab" not in client.get("/openapi.json").json()["paths"]


def test_page_is_open_and_the_api_closed_with_api_keys():
    with serve(api_keys=KEY) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert client.get("/lab").status_code == 200
        assert client.get("/lab-assets/lab.js").status_code == 200
        assert "x-request-id" in client.get("/lab").headers
        assert client.get("/v1/activations").status_code == 401
        assert client.get("/v1/activations",
                          headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # the page's own app answers only its paths: the rest stays behind the keys
        assert client.get("/lab/other").status_code == 401
        assert client.get("/labx").status_code == 401


def test_page_keeps_the_allowed_hosts_check(lab_server):
    r = httpx.get(lab_server.url + "/lab", headers={"Host": "evil.example"})
    assert r.status_code == 400


# -- in Chromium ------------------------------------------------------------------------
@pytest.mark.slow
def test_page_loads_without_console_errors_and_renders_in_a_second(browser, lab_server):
    _load(browser, lab_server.url)
    assert browser.console_errors() == []
    timings = browser.eval("lab.timings")
    assert timings["firstRender"] < 1000, timings  # ms from navigation to the first charts
    assert browser.eval("document.getElementById('chart-y').dataset.series") == "2"
    assert browser.eval("document.querySelectorAll('#chart-y canvas').length") == 1
    options = browser.eval("[...document.querySelector('#picks select').options].map(o => o.value)")
    assert set(ARTICLE) <= set(options) and "__expr__" in options
    browser.screenshot("curves-start")


@pytest.mark.slow
def test_article_comparison_plots_the_api_answers(browser, lab_server):
    _load(browser, lab_server.url)
    _check_article(browser, lab_server.url)
    assert browser.console_errors() == []
    browser.screenshot("curves-article")


@pytest.mark.slow
def test_edited_parameters_reach_the_api(browser, lab_server):
    _load(browser, lab_server.url)
    before = browser.eval("lab.state.plots")
    browser.eval("""(() => {
        const row = document.querySelector('#picks .pick');
        const sel = row.querySelector('select.act-pick');
        sel.value = 'leaky_relu'; sel.dispatchEvent(new Event('change'));
        row.querySelector('input[data-param=negative_slope]').value = '0.25';
        document.getElementById('curve-dtype').value = 'bfloat16';
        document.getElementById('plot').click();
    })()""")
    browser.wait_for(f"lab.state.plots > {before}")
    curve = browser.eval("lab.state.curves[0]")
    assert curve["request"]["params"] == {"negative_slope": 0.25}
    assert curve["dtype"] == "bfloat16"
    with httpx.Client(base_url=lab_server.url, timeout=30) as client:
        answer = _post(client, curve["path"], curve["request"])
    assert _same(curve["y"], answer["data"]) and _same(curve["dy"], answer["grad"])
    assert any(g == 0.25 for g, x in zip(curve["dy"], curve["x"], strict=True) if x < 0)


@pytest.mark.slow
def test_invalid_expression_shows_the_servers_message(browser, lab_server):
    _load(browser, lab_server.url)
    bad = "relu(x) * foo(x)"
    browser.eval(f"""(() => {{
        const row = document.querySelector('#picks .pick');
        const sel = row.querySelector('select.act-pick');
        sel.value = '__expr__'; sel.dispatchEvent(new Event('change'));
        const box = row.querySelector('input.expr');
        box.value = {json.dumps(bad)}; box.dispatchEvent(new Event('change'));
    }})()""")
    shown = browser.wait_for(
        "document.querySelector('#picks .pick [data-role=error]').textContent")
    r = httpx.post(lab_server.url + "/v1/activations/expr", json={"data": [0], "expr": bad})
    assert r.status_code == 400
    assert shown == r.json()["error"]["message"]
    assert "'foo'" in shown and "column" in shown
    browser.screenshot("curves-invalid-expression")
    # a valid one plots, and clears the message
    before = browser.eval("lab.state.plots")
    browser.eval("""(() => {
        const box = document.querySelector('#picks .pick input.expr');
        box.value = 'relu(x) * sigmoid(x)'; box.dispatchEvent(new Event('change'));
        document.getElementById('plot').click();
    })()""")
    browser.wait_for(f"lab.state.plots > {before}")
    assert browser.eval("document.querySelector('#picks .pick [data-role=error]').textContent") == ""
    assert browser.eval("lab.state.curves[0].activation") == "expr:(relu(x) * sigmoid(x))"
    network = [e for e in browser.console_errors() if not e.startswith("network:")]
    assert network == []  # the 400 of the check is the only error the console saw


@pytest.mark.slow
def test_error_view_matches_the_servers_numerics(browser, lab_server):
    _load(browser, lab_server.url)
    browser.eval("location.hash = '#error'")
    browser.wait_for("!document.getElementById('view-error').hidden")
    browser.eval("""(() => {
        document.getElementById('err-act').value = 'sigmoid';
        document.getElementById('err-run').click();
    })()""")
    browser.wait_for("document.getElementById('view-error').dataset.state === 'ready'")
    state = browser.eval("lab.state.error")
    rows = state["rows"]
    assert [(r["dtype"], r["amp"]) for r in rows] == [
        (d, a) for d in ("float16", "bfloat16", "float32") for a in ("off", "bfloat16")]
    for r in rows:
        assert len(r["ulps"]) == len(state["x"]) > 300
        assert r["max"] == pytest.approx(r["server"]["max_ulp_error"], rel=1e-12, abs=1e-12), r["label"]
        assert r["server"]["dtype"] == r["dtype"]
    assert max(r["max"] for r in rows if r["dtype"] == "bfloat16") > 0.1  # not all zero
    assert browser.eval("document.getElementById('chart-err').dataset.series") == "6"
    assert browser.eval("document.querySelectorAll('#err-table tr').length") == 7
    assert browser.console_errors() == []
    browser.screenshot("error")


@pytest.mark.slow
def test_heatmap_has_a_cell_per_activation_dtype_and_amp(browser, lab_server):
    _load(browser, lab_server.url)
    browser.eval("location.hash = '#heatmap'")
    browser.wait_for("document.getElementById('view-heatmap').dataset.state === 'ready'", 240)
    with httpx.Client(base_url=lab_server.url, timeout=120) as client:
        names = [a["name"] for a in client.get("/v1/activations").json()["activations"]
                 if a["name"] != "expr"]
        tanh = client.get("/v1/activations/tanh/accuracy").json()["rows"]
    cells = browser.eval("[...document.querySelectorAll('#heatmap a[data-cell]')]"
                         ".map(a => [a.dataset.cell, Number(a.dataset.ulp), a.getAttribute('href')])")
    assert len(cells) == len(names) * 4 * 3
    assert {c[0] for c in cells} == {f"{n}|{d}|{a}" for n in names
                                     for d in ("float16", "bfloat16", "float32", "float64")
                                     for a in ("off", "float16", "bfloat16")}
    found = {c[0]: c[1] for c in cells}
    for row in tanh:
        assert found[f"tanh|{row['dtype']}|{row['amp']}"] == row["max_ulp_error"]
    assert browser.console_errors() == []
    browser.screenshot("heatmap")
    # a cell opens its curve
    before = browser.eval("lab.state.plots")
    browser.eval("document.querySelector('#heatmap a[data-cell=\"gelu|bfloat16|off\"]').click()")
    browser.wait_for(f"lab.state.plots > {before}")
    assert browser.eval("!document.getElementById('view-curves').hidden")
    curves = browser.eval("lab.state.curves")
    assert [c["activation"] for c in curves] == ["gelu"] and curves[0]["dtype"] == "bfloat16"


@pytest.mark.slow
def test_cost_view_times_profiles_and_compares_memory(browser, lab_server):
    _load(browser, lab_server.url)
    browser.eval("location.hash = '#cost'")
    browser.eval("""(() => {
        document.getElementById('cost-act').value = 'relu';
        document.getElementById('cost-size').value = '65536';
        document.getElementById('cost-dtype').value = 'float32';
        document.getElementById('cost-count').value = '3';
        document.getElementById('cost-run').click();
    })()""")
    browser.wait_for("document.getElementById('view-cost').dataset.state === 'ready'", 120)
    cost = browser.eval("lab.state.cost")
    assert [r["mode"] for r in cost["runs"]] == ["functional"] * 3 + ["in-place"] * 3
    for run in cost["runs"]:
        assert all(run[p] >= 0 for p in ("decode", "queue", "compute", "encode", "total"))
        assert run["total"] >= run["compute"]
    assert cost["profileNote"] == ""
    assert cost["memory"]["functional"] >= 65536 * 4  # a new output
    assert cost["memory"]["in-place"] < cost["memory"]["functional"]
    assert any(o["name"] in ("aten::relu", "aten::clamp_min") for o in cost["operators"])
    assert browser.eval("document.querySelectorAll('#operators tr').length") > 1
    assert browser.console_errors() == []
    browser.screenshot("cost")


@pytest.mark.slow
def test_cost_view_says_when_profiles_are_off(browser):
    with serve() as srv:
        _load(browser, srv.url)
        browser.eval("location.hash = '#cost'")
        browser.eval("""(() => {
            document.getElementById('cost-act').value = 'tanh';
            document.getElementById('cost-count').value = '2';
            document.getElementById('cost-run').click();
        })()""")
        browser.wait_for("document.getElementById('view-cost').dataset.state === 'ready'", 120)
        cost = browser.eval("lab.state.cost")
    assert len(cost["runs"]) == 4 and cost["operators"] is None
    assert "allow-profile" in cost["profileNote"] or "ALLOW_PROFILE" in cost["profileNote"]


def _register_from_page(browser: Browser, name: str) -> None:
    browser.eval("location.hash = '#register'")
    browser.eval(f"""(() => {{
        document.getElementById('reg-name').value = {json.dumps(name)};
        document.getElementById('reg-expr').value = 'x * sigmoid(beta * x)';
        document.getElementById('reg-add-param').click();
        const row = document.querySelector('#reg-params .reg-param');
        row.querySelector('[data-field=name]').value = 'beta';
        row.querySelector('[data-field=default]').value = '1.5';
        row.querySelector('[data-field=min]').value = '0';
        row.querySelector('[data-field=max]').value = '10';
        document.getElementById('reg-desc').value = 'a swish with its own beta';
        document.getElementById('reg-form').requestSubmit();
    }})()""")
    got = browser.wait_for("document.getElementById('reg-result').dataset.registered")
    assert got == name


def _check_registered(browser: Browser, url: str, name: str, headers: dict | None = None) -> None:
    options = browser.eval("[...document.querySelector('#picks select').options].map(o => o.value)")
    assert name in options
    assert name in browser.eval("[...document.getElementById('err-act').options].map(o => o.value)")
    x = [-2.0, -0.5, 0.0, 1.0, 3.0]
    for _ in range(4):  # fresh connections: with several workers, any of them answers
        with httpx.Client(base_url=url, timeout=60, headers=headers or {}) as client:
            got = _post(client, f"/v1/activations/{name}", {"data": x, "params": {"beta": 2.0}})
            want = _post(client, "/v1/activations/expr", {"data": x, "expr": "x * sigmoid(2.0 * x)"})
            assert got["data"] == want["data"]
            entry = client.get(f"/v1/activations/{name}").json()
            assert entry["description"] == "a swish with its own beta"


@pytest.mark.slow
def test_register_from_the_page_makes_it_callable(browser, lab_server):
    _load(browser, lab_server.url)
    name = f"lab_page_{uuid.uuid4().hex[:8]}"
    _register_from_page(browser, name)
    browser.screenshot("register")
    _check_registered(browser, lab_server.url, name)
    # a second registration of the name: the server's 409 message, in place
    browser.eval("document.getElementById('reg-form').requestSubmit()")
    message = browser.wait_for("document.getElementById('reg-result').className === 'err'"
                               " && document.getElementById('reg-result').textContent")
    assert name in message
    httpx.delete(f"{lab_server.url}/v1/activations/{name}").raise_for_status()


def _check_key_flow(browser: Browser, url: str) -> dict:
    browser.open(url + "/lab")
    browser.wait_for("!document.getElementById('key-form').hidden")
    assert browser.eval("document.body.dataset.ready") is None
    browser.eval("""(() => {
        document.getElementById('key-input').value = 'wrong';
        document.getElementById('key-form').requestSubmit();
    })()""")
    browser.wait_for("document.getElementById('key-error').textContent")
    browser.eval(f"""(() => {{
        document.getElementById('key-input').value = {json.dumps(KEY)};
        document.getElementById('key-form').requestSubmit();
    }})()""")
    browser.wait_for("document.body.dataset.ready === '1' && lab.state.plots >= 1", 120)
    assert browser.eval("document.getElementById('key-form').hidden")
    stored = browser.eval("JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
    assert KEY not in stored  # the key lives in the tab's memory only
    unexpected = [e for e in browser.console_errors() if "401" not in e]
    assert unexpected == []
    return {"Authorization": f"Bearer {KEY}"}


@pytest.mark.slow
def test_page_with_two_workers_and_api_keys(browser):
    env = {"ACTSERVE_WORKERS": "2", "ACTSERVE_API_KEYS": KEY, "ACTSERVE_ENGINE": "inline"}
    with subprocess_server(env) as (_proc, url):
        headers = _check_key_flow(browser, url)
        _check_article(browser, url, headers)
        name = f"lab_workers_{uuid.uuid4().hex[:8]}"
        _register_from_page(browser, name)
        _check_registered(browser, url, name, headers)
        browser.screenshot("workers-api-keys")


@pytest.mark.slow
def test_page_with_the_engine_process(browser):
    env = {"ACTSERVE_WORKERS": "2", "ACTSERVE_ENGINE": "process", "ACTSERVE_API_KEYS": KEY,
           "ACTSERVE_ALLOW_PROFILE": "true"}
    with subprocess_server(env) as (_proc, url):
        headers = _check_key_flow(browser, url)
        _check_article(browser, url, headers)
        name = f"lab_engine_{uuid.uuid4().hex[:8]}"
        _register_from_page(browser, name)
        _check_registered(browser, url, name, headers)
        # the accuracy tables need the inline engine: the map shows the server's message
        browser.eval("location.hash = '#heatmap'")
        shown = browser.wait_for("document.getElementById('view-heatmap').dataset.state === 'error'"
                                 " && document.querySelector('#heatmap [data-role=error]').textContent")
        r = httpx.get(url + "/v1/activations/relu/accuracy", headers=headers)
        assert r.status_code == 400 and shown == r.json()["error"]["message"]
        browser.screenshot("engine-process")
