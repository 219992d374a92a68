"""What the layers above the engine use of it, and nothing more: the engine of a server
process is one of two classes, ``engine.Engine`` (``mode == "inline"``: compute threads in
this process) or ``ipc.remote.RemoteEngine`` (``mode == "process"``: the engine process owns
the devices). Both satisfy ``EngineProtocol`` (checked by ``tests/test_engine_protocol.py``),
and nothing outside ``service/engine/`` tells them apart except by ``mode``.

Torch-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.engine.activations import Activation, Registry
    from service.engine.admission import Hint
    from service.engine.capabilities import Capabilities
    from service.engine.job import BatchReport, Job
    from service.engine.jobs import JobFactory


class EngineProtocol(Protocol):
    mode: str  # "inline" or "process"
    registry: Registry  # the activations this server serves (the catalogue)
    capabilities: Capabilities  # what runs on its devices
    jobs: JobFactory  # builds validated jobs from decoded requests
    devices: list[str]
    restarts: int
    on_custom: Callable[[str, bool], None] | None  # told (name, added) of registrations

    # -- lifecycle and state
    async def start(self) -> None: ...
    async def drain(self) -> None: ...
    async def stop(self) -> None: ...
    def begin_drain(self) -> None: ...
    @property
    def ready(self) -> bool: ...
    def not_ready_reason(self) -> str: ...
    @property
    def waiting(self) -> int: ...

    # -- the request path
    def admit(self, hint: Hint | None = None) -> None: ...
    def busy(self) -> bool: ...
    # the overload state shown in /metrics (``overload``): False in all workers but the
    # first when one engine process serves them all (their numbers are summed)
    shows_overload: bool
    def lend_body(self, nbytes: int, tensor_at: int) -> Any: ...
    def submit(self, job: Job) -> asyncio.Future: ...
    def abandon(self, job: Job) -> None: ...

    # -- numbers
    def observe_batches(self, observer: Callable[[BatchReport, list], None]) -> None: ...
    def gpu_memory(self) -> list[tuple[str, int, int]]: ...
    def fusion_outcomes(self) -> dict[str, int]: ...
    def overload(self) -> dict: ...

    # -- the one registration path: custom activations and CUDA regions
    async def register_custom(self, raw: object,
                              activation: Activation | None = None) -> dict: ...
    async def unregister_custom(self, name: str) -> None: ...
    async def load_file(self, path: str) -> list[str]: ...
    async def open_cuda_region(self, name: str, raw: bytes, device_id: int,
                               byte_size: int) -> None: ...
    async def close_cuda_region(self, name: str) -> None: ...

    # -- the lab
    async def accuracy(self, name: str) -> dict: ...


MEMBERS = tuple(name for name in EngineProtocol.__annotations__) + tuple(
    name for name, value in vars(EngineProtocol).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, property)))
