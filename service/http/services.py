"""What the HTTP layer talks to: one object per app, built by ``create_app`` and kept on
``app.state.services``. Routes use its parts' public calls, never their insides."""

from __future__ import annotations

from dataclasses import dataclass

from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import SystemRegions
from service.engine.engine import Engine
from service.http.body_budget import BodyBudget
from service.http.registrations import LocalRegistrations
from service.http.traces import ProfileTraces
from service.observability.recorder import Recorder
from service.settings import Settings


@dataclass(slots=True)
class Services:
    """What the HTTP layer talks to, built once by ``create_app`` (``app.state.services``)."""

    settings: Settings
    engine: Engine
    recorder: Recorder
    bodies: BodyBudget
    regions: SystemRegions | None = None  # system shared memory (HTTP and gRPC)
    cuda_regions: CudaRegions | None = None
    traces: ProfileTraces | None = None  # profiled requests' Chrome traces (docs/lab.md)
    registrations: LocalRegistrations | None = None  # custom activations (registrations.py)
