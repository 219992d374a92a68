"""The codec seam: one class per wire format, each turning a request body into a validated
``Job`` (plus whatever its answer needs) and a result into an ``Encoded`` answer.

Codecs are stateless and torch-free. They read only the body and the few request facts
in ``Wire``; the HTTP layer (``service.http.exchange``) reads the body, calls ``decode``,
runs the job and sends what ``encode`` returns, so a route is a choice of codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.engine.activations import Activation
    from service.engine.job import Job, JobResult
    from service.engine.jobs import JobFactory


@dataclass(slots=True)
class Wire:
    """What a codec may know of the request besides its body."""

    query: bytes = b""  # the raw query string
    header_length: str | None = None  # v2 Inference-Header-Content-Length
    accept_encoding: str | None = None
    version: str | None = None  # v2 model version in the path
    content_type: str | None = None
    regions: Any = None  # v2: the registered system shared-memory regions (shm_regions)
    cuda_regions: Any = None  # v2: the registered CUDA shared-memory regions (cuda_regions)


@dataclass(slots=True)
class Encoded:
    """An answer ready to send: one buffer, or pieces sent in order without joining."""

    body: bytes | memoryview | list[bytes | memoryview]
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        if isinstance(self.body, list):
            return sum(memoryview(p).nbytes for p in self.body)
        return memoryview(self.body).nbytes


class Codec(Protocol):
    api: str  # the metrics label: "native" or "v2" (gRPC records "grpc")

    def decode(self, body: bytearray, wire: Wire, activation: Activation,
               jobs: JobFactory) -> tuple[Job, Any]:
        """Validate everything and build the job; the second value goes to ``encode``."""
        ...

    def encode(self, job: Job, answer: Any, result: JobResult) -> Encoded:
        ...

    def tensor_at(self, wire: Wire) -> int | None:
        """Where the first tensor's raw bytes start in a body of this format (so the body
        can be read straight into memory the engine lends, tensor aligned), or None when
        the body is not raw tensor bytes (JSON)."""
        ...
