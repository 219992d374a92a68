"""Operations: liveness, readiness, Prometheus metrics, the stats snapshot."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import __version__
from service.http import cluster_view

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness (warm-up self-test passed, not draining)")
async def readyz(request: Request) -> Response:
    # the same answer the protocol (while congested) and the probe port give
    status, body, retry = request.app.state.services.readiness("/readyz")
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    recorder = request.app.state.services.recorder
    if recorder.metrics is None:
        return Response("# metrics are disabled (ACTSERVE_METRICS=false)\n",
                        media_type=CONTENT_TYPE_LATEST)
    body = await cluster_view.metrics(request, recorder.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", summary="Latency percentiles and throughput per activation")
async def stats(request: Request) -> dict:
    svc = request.app.state.services
    engine, recorder = svc.engine, svc.recorder
    return await cluster_view.stats(request, {
        "version": __version__,
        "uptime_s": round(time.time() - recorder.started, 3),
        "devices": engine.devices,
        "ready": engine.ready,
        "queue_depth": engine.waiting,
        "executor_restarts": engine.restarts,
        "window_s": svc.settings.metrics_window_s,
        "activations": recorder.stats.snapshot(),
        # the overload policy of this process's queue (docs/reliability.md, "Overload"):
        # discipline, switches, predicted backlog; refusals by reason are in /metrics
        "overload": {**{k: v for k, v in engine.overload().items() if k != "prediction_error"},
                     # what a front end should pass at once (docs/deployment.md)
                     "front_limits": recorder.front.snapshot()},
    })
