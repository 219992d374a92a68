"""Which engine a server process talks to: its own (``inline``: a compute thread per
device in this process) or the shared engine process (``process``: see
``service.engine.ipc``)."""

from __future__ import annotations

import os

from service.engine.engine import Engine
from service.engine.executor import resolve_devices
from service.engine.ipc.channel import SOCKET_ENV
from service.settings import Settings


def engine_mode(settings: Settings) -> str:
    """``inline`` or ``process``; ``auto`` is ``process`` when a CUDA device is served."""
    if settings.engine != "auto":
        return settings.engine
    cuda = any(d.startswith("cuda") for d in resolve_devices(settings.device))
    return "process" if cuda else "inline"


def build_engine(settings: Settings):
    """A supervisor that runs the engine process itself says where (``SOCKET_ENV``)."""
    if os.environ.get(SOCKET_ENV) or engine_mode(settings) == "process":
        from service.engine.ipc.remote import RemoteEngine

        return RemoteEngine(settings)
    return Engine(settings)
