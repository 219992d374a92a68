"""One HTTP worker of a multi-process server: ``python -m service.process.worker``.

Started by the supervisor with a JSON spec on stdin (settings, slot, worker count, run directory,
the supervisor's pid). Runs today's app (``create_app``) with its own compute thread under
the draining uvicorn server, on its own ``SO_REUSEPORT`` listener, and joins the cluster:
its readiness flag, its snapshot socket, its periodic snapshot (``cluster.py``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from service import malloc_tuning
from service.observability import logs, probe_port
from service.process.rundir import RunDir
from service.process.sockets import worker_socket
from service.settings import Settings

PR_SET_PDEATHSIG = 1
log = logging.getLogger("actserve")


def die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the supervisor dies, however it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the call above
        raise SystemExit(0)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    die_with_parent(spec["parent"])
    settings = Settings(**spec["settings"])
    logs.configure(settings)
    malloc_tuning.tune(settings.malloc_keep_mib)

    from service.http.app import create_app
    from service.http.server import DrainingServer, uvicorn_config
    from service.process.cluster import Cluster

    slot = spec["slot"]
    run_dir = RunDir(Path(spec["run_dir"]))
    def share(local):
        from service.process.shared_registrations import SharedRegistrations

        # the cluster is made once the app exists; its peers are asked only after that
        return SharedRegistrations(local, run_dir.activations, lambda: cluster.sync_peers())

    try:
        # any worker may be asked for a profile's trace: kept where all workers look
        app = create_app(settings, traces_dir=run_dir.path / "traces",
                         share_registrations=share)
    except RuntimeError as exc:  # e.g. a CUDA device asked for where there is none
        raise SystemExit(f"actserve: {exc}") from None
    services = app.state.services
    if services.engine.mode == "process":  # one engine for all: its state shown once
        services.engine.shows_overload = slot == 0
    cluster = Cluster(slot, spec["count"], run_dir, services)
    app.state.cluster = cluster
    # ready when every worker is: the others' flags, read wherever /readyz is answered
    services.readiness = probe_port.answers(services.engine, others=cluster.not_ready_workers)

    class WorkerServer(DrainingServer):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            await cluster.start()
            log.info("actserve worker %d (pid %d) serving", slot, os.getpid())

        def handle_exit(self, sig, frame) -> None:
            cluster.begin_drain()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets=sockets)
            await cluster.stop()

    sock = worker_socket(settings.host, settings.port)
    server = WorkerServer(uvicorn_config(app, settings))
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
