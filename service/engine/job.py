"""What travels from a codec through the batcher to the executor and back. Torch-free: the
activation type is only named for type checkers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.engine.activations import Activation
    from service.engine.device_refs import DeviceRef


@dataclass(frozen=True, slots=True)
class Mode:
    """How a job is computed; part of its batch key."""

    compute_dtype: str | None  # None: the input's own dtype
    amp: bool
    amp_dtype: str | None  # None: the device's default autocast dtype
    inplace: bool


VALUE_ONLY = ("value",)
OUTPUTS = ("value", "grad")


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
    # where the answer's bytes go, when the caller provides room (the engine process: a
    # shared-memory slot); the compute thread copies the result there
    out: np.ndarray | None = None
    # the lab (docs/lab.md): which answers ("value", "grad"), the upstream gradient of a
    # vector-Jacobian product (wire storage, the input's shape and dtype), and the reports
    # asked for (their names: service/engine/reports)
    outputs: tuple[str, ...] = VALUE_ONLY
    grad_output: np.ndarray | None = None
    report: frozenset[str] = frozenset()
    # CUDA shared memory (device_refs.py): the input and/or the answer live in a client's
    # registered region; ``array`` is then a zero-stride placeholder of the input's shape
    device_in: DeviceRef | None = None
    device_out: DeviceRef | None = None

    @property
    def lab(self) -> bool:
        """Needs more than the value: computed alone, outside any packing (``lab.py``)."""
        return self.outputs != VALUE_ONLY or bool(self.report)

    @property
    def alone(self) -> bool:
        """Computed by itself, never packed with others (``lab.py``, ``device_io.py``)."""
        return (self.lab or not self.activation.packs or self.device_in is not None
                or self.device_out is not None)

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
    # called once the answer has been sent, when ``array`` lives in memory lent for it
    release: Callable[[], None] | None = None
    # the lab: the gradient (wire storage of ``grad_dtype``) and the reports asked for
    grad: np.ndarray | None = None
    grad_dtype: str | None = None
    reports: dict = field(default_factory=dict)


@dataclass(slots=True)
class BatchReport:
    """What observers learn of one executed batch (metrics, v2 batch statistics)."""

    activation: str
    requests: int
    elements: int
    device: str  # "unknown" when no request of the batch succeeded
    wall_s: float  # the compute thread's wall time for the batch
    compute_s: float  # CUDA: the batch's event-timed kernel time; CPU: the wall time
    h2d_s: float = 0.0
    d2h_s: float = 0.0

    @classmethod
    def of(cls, jobs: list[Job], results: list, wall: float) -> BatchReport:
        ok = next((r for r in results if isinstance(r, JobResult)), None)
        device = ok.device if ok is not None else "unknown"
        gpu = device.startswith("cuda")
        # every result of a batch carries the batch's element count
        elements = ok.batch_elements if ok is not None else sum(j.numel for j in jobs)
        return cls(jobs[0].activation.name, len(jobs), elements, device, wall,
                   ok.compute_s if gpu else wall,
                   ok.extra.get("h2d", 0.0) if gpu else 0.0,
                   ok.extra.get("d2h", 0.0) if gpu else 0.0)
