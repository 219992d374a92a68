"""Which engine a server process talks to: its own (``inline``: a compute thread per
device in this process) or the shared engine process (``process``: see
``service.engine.ipc``). The mode is decided here and only here (``engine_mode``), without
torch, so the supervisor of several workers and each worker agree."""

from __future__ import annotations

import os

from service.engine.ipc.channel import SOCKET_ENV
from service.settings import Settings

NVIDIA_DEVICE = "/dev/nvidiactl"  # the NVIDIA driver's device node


def engine_mode(settings: Settings) -> str:
    """``inline`` or ``process``: as set, else (``auto``) ``process`` when a CUDA device is
    served: one named (``cuda``, ``cuda:N``), or ``device=auto|all`` where the NVIDIA
    driver's device node exists."""
    if settings.engine != "auto":
        return settings.engine
    device = settings.device
    if "cuda" in device:
        return "process"
    return "process" if device in ("auto", "all") and os.path.exists(NVIDIA_DEVICE) else "inline"


def build_engine(settings: Settings):
    """The engine of this process (``protocol.EngineProtocol``). A supervisor that runs
    the engine process itself says where (``SOCKET_ENV``)."""
    if os.environ.get(SOCKET_ENV) or engine_mode(settings) == "process":
        from service.engine.ipc.remote import RemoteEngine

        if not os.environ.get(SOCKET_ENV):  # this process starts the engine: devices first
            from service.engine.executor import resolve_devices

            resolve_devices(settings.device)  # RuntimeError now (one line at start-up), not
            # an engine process that fails and is restarted while readiness never comes
        return RemoteEngine(settings)
    from service.engine.engine import Engine

    return Engine(settings)
