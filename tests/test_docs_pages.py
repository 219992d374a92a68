"""``/docs`` and ``/redoc`` work offline: the pages load their assets from the server
itself, and Swagger UI renders the operations in a real (headless) Chromium.

Without Chromium the browser test skips locally; in CI (``CI=true``) it fails instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest


def test_pages_reference_only_local_assets(server, client):
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200, page
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
        urls += re.findall(r"""url: ?["']([^"']+)["']""", r.text)
        assert urls, page
        for url in urls:
            assert url.startswith("/"), (page, url)  # nothing from a CDN
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 0, url
    assert len(client.get("/docs-assets/swagger-ui-bundle.js").content) > 100_000
    spec = client.get("/openapi.json").json()
    assert "/v1/activations/{name}" in spec["paths"] and "/docs" not in spec["paths"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is required in CI: .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.mark.slow
def test_swagger_ui_renders_the_operations_in_headless_chromium(server):
    browser = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--virtual-time-budget=20000", "--dump-dom", server.url + "/docs"],
            capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'class="swagger-ui' in dom, dom[:2000]
    # the operations, rendered by Swagger UI's JavaScript (absent from the served HTML)
    for path in ("/v1/activations/{name}", "/v2/models/{name}/infer", "/healthz"):
        assert f'data-path="{path}"' in dom, path
    assert re.search(r'opblock-summary-method">POST<', dom)
