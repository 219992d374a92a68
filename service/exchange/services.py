"""What the transports talk to: one object per app, built by ``create_app`` and kept on
``app.state.services`` (and handed to the gRPC server). Transports use its parts' public
calls, never their insides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import SystemRegions
from service.engine.engine import Engine
from service.exchange.budget import BodyBudget
from service.exchange.request_start import Starts
from service.observability.logs import AccessLog
from service.observability.recorder import Recorder
from service.settings import Settings

if TYPE_CHECKING:  # built by the HTTP layer, used by every transport through their calls
    from service.http.registrations import Registrations
    from service.http.shed import Shed
    from service.http.traces import ProfileTraces


@dataclass(slots=True)
class Services:
    """Built once by ``create_app`` (``app.state.services``)."""

    settings: Settings
    engine: Engine
    recorder: Recorder
    bodies: BodyBudget
    regions: SystemRegions | None = None  # system shared memory (HTTP and gRPC)
    cuda_regions: CudaRegions | None = None
    traces: ProfileTraces | None = None  # profiled requests' Chrome traces (docs/lab.md)
    registrations: Registrations | None = None  # custom activations (registrations.py)
    access_log: AccessLog | None = None  # one line per request, every transport
    shed: Shed | None = None  # HTTP refusals before the application (shed.py)
    # trusted X-Request-Start stamps (request_start.py); None: trust_request_start off
    starts: Starts | None = None
    # (path) -> (status, JSON body, Retry-After): /healthz and /readyz, wherever answered
    # (service/observability/probe_port.py ``answers``; a worker's asks the cluster)
    readiness: Callable[[str], tuple] | None = None
