"""Every message between a worker and the engine process, typed (docs/engine.md).

Each message is a ``msgspec.Struct`` with ``array_like=True``: on the wire it is a MessagePack
array whose first item is its tag (``"job"``, ``"done"``, ...) and whose other items are its
fields in the order declared here. Both ends build and read these classes; nothing is packed
or unpacked by position anywhere else. Only plain values travel (numbers, strings, bytes,
lists, maps); tensors stay in the arenas.

``PROTOCOL`` is checked at ``hello``: an engine that speaks another version answers with a
fatal ``State`` naming both versions (the worker stops starting, saying so). ``Hello`` and
``State`` keep their leading fields in every version, so that refusal is always readable.
Change ``PROTOCOL`` whenever any message changes.

Torch-free.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL = 3


class _Message(msgspec.Struct, array_like=True, gc=False, omit_defaults=False):
    pass


# -- worker -> engine ------------------------------------------------------------------------
class Hello(_Message, tag="hello"):
    """First message of a connection: who the worker is and where its arena is."""

    protocol: int
    pid: int
    arena: str


class Job(_Message, tag="job"):
    """A job's descriptor: its tensors lie in the worker's arena at the offsets named (or
    in a client's CUDA region, ``device_in``/``device_out``: ``(region, offset, nbytes)``,
    taking no arena bytes)."""

    id: int
    activation: str
    params: tuple[tuple[str, Any], ...]
    wire_dtype: str
    shape: tuple[int, ...]
    in_offset: int
    out_offset: int
    out_capacity: int
    compute_dtype: str | None
    amp: bool
    amp_dtype: str | None
    inplace: bool
    deadline: float  # time.monotonic, shared by the processes of one machine
    priority: int
    api: str
    request_id: str
    fault: str | None
    outputs: tuple[str, ...]  # the lab (docs/lab.md)
    report: frozenset[str]  # the reports' names (service/engine/reports)
    upstream: bool  # the upstream gradient follows the input, on a slot boundary
    expr: str | None  # an inline expression's normalized text (the engine resolves it)
    device_in: tuple[str, int, int] | None
    device_out: tuple[str, int, int] | None


class Cancel(_Message, tag="cancel"):
    id: int


class Register(_Message, tag="register"):
    """A custom activation's raw registration (``custom.build``), answered by ``Registered``."""

    request: int
    raw: Any


class Unregister(_Message, tag="unregister"):
    request: int
    name: str


class CudaRegister(_Message, tag="cuda_register"):
    """Open a CUDA IPC handle in the device's compute thread; answered by ``Registered``."""

    request: int
    name: str
    handle: bytes
    device_id: int
    byte_size: int


class CudaUnregister(_Message, tag="cuda_unregister"):
    request: int
    name: str


# -- engine -> worker ------------------------------------------------------------------------
class State(_Message, tag="state"):
    """The engine's readiness; ``fatal``: it cannot serve (a bad --activations-file, a
    worker of another protocol)."""

    ready: bool
    reason: str
    fatal: bool
    devices: list[str] = []
    capability_failures: list[tuple[tuple[Any, ...], str]] = []
    restarts: int = 0
    waiting: int = 0
    # the overload policy's state (``admission.Admission.snapshot``): sent with readiness
    # changes and, while it changes, at most once a second (``EngineHost``)
    overload: dict[str, Any] = {}


class Batch(_Message, tag="batch"):
    """A batch's report (``job.BatchReport``), on the batch's first answered job only."""

    activation: str
    requests: int
    elements: int
    device: str
    wall_s: float
    compute_s: float
    h2d_s: float
    d2h_s: float


class Done(_Message, tag="done"):
    """A job's answer lies in its answer slot (the gradient at the slot's end)."""

    id: int
    dtype: str
    shape: tuple[int, ...]
    compute_s: float
    batch_requests: int
    batch_elements: int
    device: str
    queue_s: float
    extra: dict[str, Any]
    batch: Batch | None
    grad_dtype: str | None  # None: no gradient
    reports: dict[str, Any]  # each as its report carries it (reports.to_channel)
    wait_s: float = 0.0  # the engine's predicted wait for a new request (admission.RemoteWait)


class Error(_Message, tag="error"):
    id: int
    error_type: str
    message: str
    batch: Batch | None = None
    wait_s: float = 0.0  # as on ``Done``


class Cancelled(_Message, tag="cancelled"):
    id: int


class Registered(_Message, tag="registered"):
    """The answer to ``Register``, ``Unregister``, ``CudaRegister`` and ``CudaUnregister``;
    ``error_type`` None: done, ``entry``: the catalogue entry, or None."""

    request: int
    error_type: str | None = None
    message: str | None = None
    entry: Any = None


class Activation(_Message, tag="activation"):
    """To every worker: a custom activation the engine now serves (also each one it has,
    right after hello and before its state)."""

    raw: Any


class Removed(_Message, tag="removed"):
    """To every worker: a custom activation the engine no longer serves."""

    name: str


ToEngine = Hello | Job | Cancel | Register | Unregister | CudaRegister | CudaUnregister
ToWorker = State | Done | Error | Cancelled | Registered | Activation | Removed


class Unreadable(msgspec.Struct, gc=False):
    """Not a message: what a decoder hands on for a frame it cannot read (never sent)."""

    error: str
    raw: Any  # the frame as plain values, or None when it is not MessagePack at all


_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_plain = msgspec.msgpack.Decoder()


def _reader(decoder: msgspec.msgpack.Decoder):
    def decode(frame: memoryview) -> Any:
        try:
            return decoder.decode(frame)
        except msgspec.DecodeError as exc:
            try:
                raw = _plain.decode(frame)
            except msgspec.DecodeError:
                raw = None
            return Unreadable(str(exc), raw)

    return decode


for_engine = _reader(_to_engine)  # what the engine reads
for_worker = _reader(_to_worker)  # what a worker reads


def hello_protocol(unreadable: Unreadable) -> int | None:
    """The protocol a hello the engine could not read says it speaks, or None."""
    raw = unreadable.raw
    if isinstance(raw, list) and len(raw) > 1 and raw[0] == "hello" and isinstance(raw[1], int):
        return raw[1]
    return None


def refusal(protocol: object) -> State:
    """The engine's answer to a worker of another protocol."""
    return State(False, f"this worker speaks engine channel protocol {protocol} and the engine "
                        f"process speaks {PROTOCOL}: run the workers and the engine process "
                        "from the same actserve install (restart the server)", True)
