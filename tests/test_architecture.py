"""The map and the layers: docs/architecture.md names every module under service/ and names
no path that does not exist; service/ has no import cycle (type-checking imports aside);
the Host guard counts what it refuses."""

from __future__ import annotations

import re

import grimp
import httpx

from .conftest import ROOT, serve

DOC = ROOT / "docs" / "architecture.md"
PATH = re.compile(r"(?<![\w/.-])((?:service|clients|loadtest|scripts|tests|docs|deploy)"
                  r"/[\w./-]*\w)")


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "service").rglob("*.py")
                  if "__pycache__" not in p.parts)


def _named(module: str, text: str, paths: set[str]) -> bool:
    """A module is named by its path, or, in the map's tree, by its file name under its
    package's heading (``service/<package>/``, and ``<sub>/`` for a sub-package)."""
    if module in paths:
        return True
    parts = module.split("/")
    name = parts[-1]
    if name == "__main__.py":
        return "service/__main__.py" in text
    if not re.search(rf"(?<![\w/]){re.escape(name)}\b", text):
        return False
    package = "/".join(parts[:2]) + "/"
    return package in text and all(f"{sub}/" in text for sub in parts[2:-1])


def test_the_map_names_every_module_and_only_paths_that_exist():
    text = DOC.read_text()
    paths = set(PATH.findall(text))
    missing = [m for m in _modules() if not m.endswith("__init__.py") and
               not _named(m, text, paths)]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    absent = sorted(p for p in paths if not (ROOT / p).exists())
    assert not absent, f"docs/architecture.md names paths that do not exist: {absent}"


def test_no_import_cycle_inside_service():
    graph = grimp.build_graph("service", exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components, iteratively
        work = [(v, iter(sorted(graph.find_modules_directly_imported_by(v))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            strong(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_host_guard_counts_every_host_it_refuses():
    with serve(allowed_hosts="api.example") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(3):
            assert c.get("/healthz", headers={"host": "evil.example"}).status_code == 400
        assert c.get("/healthz", headers={"host": "api.example"}).status_code == 200
        metrics = srv.services.recorder.metrics.exposition().decode()
    assert 'actserve_rejections_total{reason="invalid"} 3.0' in metrics
