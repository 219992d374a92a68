"""Docs hygiene: every relative link and every repository path named in README.md and docs/
exists, so no page sends a reader to a file that is not there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"),
                ROOT / "clients" / "python" / "README.md"])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".git")} - {".venv"}
GENERATED = ("loadtest/reports",)  # run outputs (git-ignored), named as where they will appear


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text())
            if not re.match(r"^[a-z]+:|^#|^//", t)]


TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
SOURCE_EXT = r"\.(?:py|md|sh|yml|yaml|toml|lua|cfg|ini)"
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]*|[\w-]+(?:\.[\w-]+)*" + SOURCE_EXT
                        + r")(?![\w/-])")


def _paths(page: Path) -> list[str]:
    """Repository paths named anywhere in the page (prose, tables, code blocks): a token whose
    first part is a top-level entry (``service/http/app.py``, ``docs/gpu.md``), or a bare
    source-file name (``header_timeout.py``), which must be some tracked file's name."""
    found = []
    for token in PATH_TOKEN.findall(page.read_text()):
        token = token.rstrip(".,:;")
        first = token.split("/")[0]
        if "/" in token:
            if first in TOP and first != token and not token.startswith(GENERATED):
                found.append(token)
        elif re.search(SOURCE_EXT + "$", token):
            found.append(token)
    return found


def _exists(token: str) -> bool:
    if "/" in token:
        return (ROOT / token.rstrip("/")).exists()
    return any(Path(f).name == token for f in TRACKED)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = []
    for target in _links(page):
        path = target.split("#")[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page):
    missing = sorted({p for p in _paths(page) if not _exists(p)})
    assert missing == [], f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_the_checker_sees_paths_and_links():
    readme = ROOT / "README.md"
    assert "service/errors.py" in _paths(readme)
    assert "docs/architecture.md" in _links(readme)
    assert _exists("header_timeout.py") and not _exists("no_such_module.py")
    assert not _exists("service/nothing_here.py")
    arch = _paths(ROOT / "docs" / "architecture.md")
    assert "batcher.py" in arch and "service/http/app.py" in arch


EXTRAS = {"torch": "torch", "ml_dtypes": "bfloat16"}  # imported module -> the client extra


def test_each_client_example_names_its_extras():
    """A guide example that imports an optional dependency says which extra brings it."""
    guide = (ROOT / "clients" / "python" / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", guide, flags=re.S | re.M)
    checked = 0
    for block in blocks:
        imported = set(re.findall(r"^(?:import|from) (\w+)", block, flags=re.M))
        needed = sorted(EXTRAS[m] for m in imported if m in EXTRAS)
        if "actserve_client.torch" in block:
            needed = sorted({*needed, "torch"})
        if not needed:
            continue
        checked += 1
        first = block.splitlines()[0]
        assert first.startswith("# needs the "), block[:200]
        for extra in needed:
            assert f"[{extra}]" in first or extra in first.split("[")[-1], (extra, first)
    assert checked >= 2


WRITES = re.compile(r"(?:\s-o\s+|--output\s+|\s>>?\s*)(?P<target>[^\s|;&)]+)")


def test_shell_examples_leave_nothing_in_the_working_tree():
    """``curl -o file`` or ``> file`` in a page's shell examples must write outside the
    checkout (an absolute path such as ``/dev/null`` or ``/tmp/...``, or ``.git/``), to stdout
    (``-``), or regenerate
    a tracked file."""
    bad = []
    for page in PAGES:
        for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", page.read_text(),
                                flags=re.S | re.M):
            for line in block.splitlines():
                code = line.split(" #", 1)[0]
                for m in WRITES.finditer(code):
                    target = m.group("target")
                    if not (target.startswith(("/", "&", ".git/")) or target == "-"
                            or target in TRACKED):
                        bad.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert bad == []
