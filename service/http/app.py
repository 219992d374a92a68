"""The application factory. Nothing is built at import time."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from service import __version__
from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import SystemRegions
from service.engine.factory import build_engine
from service.exchange.budget import BodyBudget
from service.exchange.request_start import Starts
from service.exchange.services import Services
from service.http import docs_pages, error_responses, lab_page
from service.http.fastpath import FastPath
from service.http.guard import Guard
from service.http.middleware import RequestContext
from service.http.registrations import for_engine
from service.http.routes_custom import router as custom_router
from service.http.routes_lab import router as lab_router
from service.http.routes_native import activate
from service.http.routes_native import router as native_router
from service.http.routes_ops import router as ops_router
from service.http.routes_shm import router as shm_router
from service.http.routes_v2 import infer, infer_version
from service.http.routes_v2 import router as v2_router
from service.http.shed import Shed
from service.http.traces import ProfileTraces
from service.observability import probe_port
from service.observability.logs import AccessLog
from service.observability.recorder import Recorder
from service.settings import Settings

log = logging.getLogger("actserve")


def _no_framework_telemetry() -> dict:
    """FastAPI 0.16x checks for OpenTelemetry providers on every request (about 5 % of the
    event loop per small request); actserve has its own metrics, so switch that off where
    the installed FastAPI has the option."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


async def _start_grpc(services: Services):
    """The KServe v2 gRPC server on ``grpc_port`` in this event loop, or None (port 0)."""
    if not services.settings.grpc_port:
        return None
    from service.grpc.server import GrpcServer  # grpcio is loaded only when gRPC is on

    server = GrpcServer(services)
    await server.start()
    return server


def create_app(settings: Settings | None = None, *, traces_dir: Path | None = None,
               share_registrations: Callable | None = None) -> FastAPI:
    """The app, its ``Services`` complete. A worker of several passes where the profiles'
    traces are kept for every worker (``traces_dir``) and how its registrations are shared
    with the others when each worker has its own engine (``share_registrations``, given the
    engine's registrations, returns the shared ones)."""
    settings = settings or Settings()
    engine = build_engine(settings)
    recorder = Recorder([*engine.registry.names(), "expr"], metrics=settings.metrics,
                        window_s=settings.metrics_window_s,
                        front_delay_s=settings.front_delay_ms / 1000)
    bodies = BodyBudget(settings.max_body_bytes_in_flight)
    engine.observe_batches(recorder.observe_batch)
    recorder.track(queue_depth=lambda: engine.waiting, bodies_held=lambda: bodies.held,
                   bodies_waiting=lambda: bodies.waiting, restarts=lambda: engine.restarts,
                   ready=lambda: engine.ready, gpu_memory=engine.gpu_memory,
                   fusion=engine.fusion_outcomes)
    if recorder.metrics is not None:
        recorder.metrics.track_overload(engine.overload)  # service/engine/admission.py
    access_log = AccessLog(settings.log_format) if settings.access_log else None
    services = Services(settings, engine, recorder, bodies,
                        regions=SystemRegions(enabled=settings.shared_memory),
                        cuda_regions=CudaRegions(engine.devices, settings.shared_memory,
                                                 opener=engine.open_cuda_region,
                                                 closer=engine.close_cuda_region,
                                                 emulate=settings.fault_injection),
                        traces=ProfileTraces(settings.profile_trace_ttl_s, directory=traces_dir),
                        registrations=for_engine(engine, recorder.model_stats),
                        access_log=access_log)
    services.readiness = probe_port.answers(engine)  # a worker's asks the cluster too
    services.shed = Shed(services)  # overload refusals before the app (shed.py)
    if settings.trust_request_start:  # deadlines from callers' stamps (request_start.py)
        m = recorder.metrics
        services.starts = Starts(
            m.child(m.request_start_wait).observe if m is not None else None)
    if share_registrations is not None and engine.mode == "inline":
        # the engine process holds one set for every worker; inline engines share files
        services.registrations = share_registrations(services.registrations)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if access_log is not None:
            access_log.start()
        await engine.start()
        try:
            if settings.activations_file:
                await services.registrations.load_file(settings.activations_file)
            await services.registrations.start()  # several workers: what the others have
        except BaseException:
            await engine.stop()  # start-up fails with the file's problem
            raise
        # Everything alive now (torch, the app, the registry) lives as long as the process:
        # move it out of the collector's sight, so that full collections during serving
        # walk only the objects requests create (shorter GC pauses, a shorter tail).
        gc.collect()
        gc.freeze()
        grpc_server = await _start_grpc(services)
        log.info("actserve ready=%s on %s", engine.ready, engine.devices)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.graceful_shutdown_s)
            await engine.drain()
            await engine.stop()
            services.regions.close()
            services.cuda_regions.close()
            if access_log is not None:
                access_log.close()  # every line of the drained requests is written

    app = FastAPI(
        title="actserve",
        version=__version__,
        summary="Batched activation inference over HTTP (native and KServe v2 APIs)",
        lifespan=lifespan,
        docs_url=None,  # served by docs_pages, with local assets instead of a CDN
        redoc_url=None,
        redirect_slashes=False,  # a redirect would reflect the client's Host
        **_no_framework_telemetry(),
    )
    app.state.services = services
    app.state.access_log = access_log
    error_responses.install(app)
    docs_pages.install(app)  # /docs and /redoc, assets served locally
    app.include_router(native_router)
    app.include_router(custom_router)
    app.include_router(lab_router)
    app.include_router(ops_router)
    app.include_router(v2_router)
    app.include_router(shm_router)
    # The ASGI stack, outermost first: CORS (when configured), request context (ids, auth,
    # access log), the fast path for the hot routes, then the framework's own stack (error
    # middleware, router) for everything else. Built here, once, so the hot routes skip the
    # framework's middlewares as well as its router (docs/benchmarks.md).
    stack = RequestContext(
        Guard(FastPath(app.build_middleware_stack(), routes=[
            (r"/v1/activations/(?P<name>[^/]+)", activate),
            (r"/v2/models/(?P<name>[^/]+)/infer", infer),
            (r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer", infer_version),
        ]), allowed_hosts=settings.allowed_host_list, recorder=recorder),
        access_log=access_log, api_keys=settings.api_key_list, recorder=recorder,
    )
    stack = lab_page.install(app, stack, access_log)  # /lab: the page, outside the API keys
    if settings.cors_origin_list:
        from fastapi.middleware.cors import CORSMiddleware

        stack = CORSMiddleware(stack, allow_origins=settings.cors_origin_list,
                               allow_methods=["GET", "POST"], allow_headers=["*"])
    app.middleware_stack = stack
    return app
