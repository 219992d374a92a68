"""The declared engine (``service/engine/protocol.py``): both engines have every member of
``EngineProtocol`` with the same shape, the layers above use nothing else of an engine, and
nothing outside ``service/engine/`` tells the two apart but by ``mode``; the mode is decided
in one place."""

from __future__ import annotations

import inspect
import re

from service.engine import factory
from service.engine.engine import Engine
from service.engine.ipc.remote import RemoteEngine
from service.engine.protocol import MEMBERS, EngineProtocol
from service.settings import Settings

from .conftest import ROOT

SERVICE = ROOT / "service"


def _outside_engine():
    for path in sorted(SERVICE.rglob("*.py")):
        if "engine" not in path.relative_to(SERVICE).parts[:1]:
            yield path, path.read_text()


def test_both_engines_have_every_member_with_the_same_shape():
    engines = {"inline": Engine(Settings(grpc_port=0)),
               "process": RemoteEngine(Settings(grpc_port=0, engine="process"))}
    for mode, engine in engines.items():
        assert engine.mode == mode
        for name in MEMBERS:
            assert hasattr(engine, name), (mode, name)
            declared = getattr(EngineProtocol, name, None)
            if inspect.isfunction(declared):
                got = getattr(type(engine), name)
                assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(declared), \
                    (mode, name)
                want = list(inspect.signature(declared).parameters)
                have = list(inspect.signature(got).parameters)
                assert have[:len(want)] == want, (mode, name, have, want)


def test_the_layers_above_use_only_the_protocol_and_never_isinstance():
    modules = {p.stem for p in (SERVICE / "engine").rglob("*.py")} | {"ipc", "reports"}
    used: dict[str, set[str]] = {}
    for path, text in _outside_engine():
        assert not re.search(r"isinstance\([^)]*\b(Remote)?Engine\b", text), path
        for name in re.findall(r"(?<![\w.\"/])(?:\w+\.)?engine\.([a-z_]+)", text):
            if name not in modules:
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: where for name, where in used.items() if name not in MEMBERS}
    assert not unknown, f"engine members used above the engine but not declared: {unknown}"


def test_the_engine_mode_is_decided_in_one_place():
    settings = Settings(grpc_port=0, engine="auto", device="cpu")
    assert factory.engine_mode(settings) == "inline"
    assert factory.engine_mode(Settings(grpc_port=0, engine="process")) == "process"
    assert factory.engine_mode(Settings(grpc_port=0, engine="auto", device="cuda:0")) == "process"
    calls = [path for path, text in _outside_engine()
             if re.search(r"settings\.engine\s*[!=]=|def shared_engine", text)]
    assert not calls, f"the engine mode is decided outside engine/factory.py: {calls}"


def test_the_engine_warms_autograds_imports_before_it_is_ready():
    """``warm_autograd``: what torch's first gradient imports (sympy) is imported during
    start-up, before the engine reports ready (in a fresh interpreter: nothing imported it
    before)."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from service.engine.engine import Engine\n"
        "from service.settings import Settings\n"
        "async def main(warm):\n"
        "    engine = Engine(Settings(grpc_port=0, warm_autograd=warm))\n"
        "    await engine.start()\n"
        "    print(engine.ready, 'torch.fx.experimental.symbolic_shapes' in sys.modules)\n"
        "    await engine.stop()\n"
        "asyncio.run(main(sys.argv[1] == 'on'))\n")
    for warm, want in (("off", "True False"), ("on", "True True")):
        out = subprocess.run([sys.executable, "-c", code, warm], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == want, (warm, out.stdout, out.stderr[-2000:])
