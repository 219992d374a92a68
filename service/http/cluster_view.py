"""What the ops and statistics routes need to answer for the whole server when it runs as
several worker processes (``app.state.cluster``, set by ``service/process/worker.py``), and
for this process alone otherwise."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request


def _cluster(request: Request):
    return getattr(request.app.state, "cluster", None)


def workers_not_ready(request: Request) -> list[int]:
    """Slots of the server's workers that are not ready (empty for a single process)."""
    cluster = _cluster(request)
    return [] if cluster is None else cluster.not_ready_workers()


async def metrics(request: Request, own: Callable[[], bytes]) -> bytes:
    cluster = _cluster(request)
    return own() if cluster is None else await cluster.metrics()


async def stats(request: Request, own: dict) -> dict:
    """``/v1/stats``: this process's answer, or every worker's merged into it."""
    cluster = _cluster(request)
    if cluster is None:
        return own
    merged = await cluster.stats()
    return {**own, "ready": own["ready"] and not cluster.not_ready_workers(),
            "queue_depth": merged["queue_depth"],
            "executor_restarts": merged["executor_restarts"], "workers": merged["workers"],
            # what a front end should pass to all the workers together (summed)
            "overload": {**own["overload"], "front_limits": merged["front_limits"]},
            "activations": merged["activations"]}


async def model_stats(request: Request, own: dict, name: str | None = None) -> dict:
    """``/v2/models[/{name}]/stats``: this process's, or summed over every worker."""
    cluster = _cluster(request)
    return own if cluster is None else await cluster.model_stats(name)
