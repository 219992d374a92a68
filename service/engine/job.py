"""What travels from a codec through the batcher to the executor and back. Torch-free: the
activation type is only named for type checkers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.engine.activations import Activation


@dataclass(frozen=True, slots=True)
class Mode:
    """How a job is computed; part of its batch key."""

    compute_dtype: str | None  # None: the input's own dtype
    amp: bool
    amp_dtype: str | None  # None: the device's default autocast dtype
    inplace: bool


@dataclass(slots=True, eq=False)
class Job:
    activation: Activation
    params: tuple
    array: np.ndarray  # wire storage, C-contiguous, writable (bfloat16 as uint16 bits)
    wire_dtype: str
    mode: Mode
    deadline: float  # event-loop clock (time.monotonic)
    priority: int = 0
    api: str = "native"
    request_id: str = ""
    future: asyncio.Future | None = None
    seq: int = 0
    t_enqueue: float = 0.0
    t_dispatch: float = 0.0
    # fault injection for tests (only honoured when the server enables it)
    fault: str | None = None

    @property
    def numel(self) -> int:
        return int(self.array.size)

    @property
    def compute_dtype(self) -> str:
        return self.mode.compute_dtype or self.wire_dtype

    @property
    def key(self) -> tuple:
        return (self.activation.name, self.params, self.compute_dtype, self.mode)


@dataclass(slots=True)
class JobResult:
    array: np.ndarray  # output storage in ``dtype`` (bfloat16 as uint16 bits)
    dtype: str
    compute_s: float
    batch_requests: int
    batch_elements: int
    device: str
    queue_s: float = 0.0
    extra: dict = field(default_factory=dict)
