"""Operations: liveness, readiness, Prometheus metrics, the stats snapshot."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import __version__
from service.errors import NotReady
from service.http import cluster_view

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness (warm-up self-test passed, not draining)")
async def readyz(request: Request) -> Response:
    rt = request.app.state.runtime
    others = cluster_view.workers_not_ready(request)  # several worker processes: all ready
    if rt.ready and not others:
        return JSONResponse({"status": "ready", "devices": rt.devices})
    if rt.ready:
        reason = f"worker slot(s) {others} not ready"
    elif rt.batcher.draining:
        reason = "draining"
    elif rt.pool.selftest_problems:
        reason = "self-test failed: " + "; ".join(rt.pool.selftest_problems[:5])
    else:
        reason = "warming up or restarting the compute executor"
    raise NotReady(f"not ready: {reason}")


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    rt = request.app.state.runtime
    if rt.metrics is None:
        return Response("# metrics are disabled (ACTSERVE_METRICS=false)\n",
                        media_type=CONTENT_TYPE_LATEST)
    body = await cluster_view.metrics(request, rt.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", summary="Latency percentiles and throughput per activation")
async def stats(request: Request) -> dict:
    rt = request.app.state.runtime
    return await cluster_view.stats(request, {
        "version": __version__,
        "uptime_s": round(time.time() - rt.started, 3),
        "devices": rt.devices,
        "ready": rt.ready,
        "queue_depth": rt.batcher.waiting,
        "executor_restarts": rt.pool.restarts,
        "window_s": rt.settings.metrics_window_s,
        "activations": rt.stats.snapshot(),
    })
