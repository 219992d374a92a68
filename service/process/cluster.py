"""A worker's view of the whole server: readiness of every worker, and the numbers of
every worker merged (``/metrics``, ``/v1/stats``, ``/v2/models/stats``).

Set as ``app.state.cluster`` by ``worker.py``; a single-process server has none, and the
routes then answer from their own process as before (``service/http/cluster_view.py``).
Runs on the worker's event loop only.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
from prometheus_client.exposition import generate_latest

from service.observability import front_limits
from service.observability.stats import summarize
from service.process import merge
from service.process.peers import PeerServer, ask
from service.process.rundir import ReadyFlags, RunDir
from service.process.shared_registrations import SYNC_TIMEOUT_S
from service.process.snapshots import PERIOD_S, SnapshotFiles

PUBLISH_S = 0.05  # how often a worker writes its readiness flag


class Cluster:
    def __init__(self, slot: int, count: int, run: RunDir, services) -> None:
        self.slot = slot
        self.count = count
        self.run = run
        self.services = services
        self.engine = services.engine
        self.recorder = services.recorder
        self.settings = services.settings
        self.flags = ReadyFlags(run.path / "ready", count)
        self.files = SnapshotFiles(run.snapshots)
        self.peer_server = PeerServer(run.socket(slot), self._answer)
        self._task: asyncio.Task | None = None
        self.draining = False

    # -- lifecycle (the worker's server calls these) ---------------------------------------
    async def start(self) -> None:
        await self.peer_server.start()
        # a registration made while this worker started, before its peer socket was up
        await self.services.registrations.sync()
        self._publish()
        self._task = asyncio.ensure_future(self._publisher())

    def begin_drain(self) -> None:
        self.draining = True
        self.flags.set(self.slot, False)

    async def stop(self) -> None:
        self.begin_drain()
        if self._task is not None:
            self._task.cancel()
        await self.peer_server.stop()
        self._write_snapshot()
        self.flags.close()

    async def _publisher(self) -> None:
        ticks = max(1, round(PERIOD_S / PUBLISH_S))
        n = 0
        while True:
            await asyncio.sleep(PUBLISH_S)
            self._publish()
            n += 1
            if n % ticks == 0:
                self._write_snapshot()

    def _publish(self) -> None:
        self.flags.beat(self.slot, time.monotonic())  # before the flag: never ready and stale
        self.flags.set(self.slot, self.engine.ready and not self.draining)

    def _write_snapshot(self) -> None:
        try:
            self.files.write(self.slot, {"metrics": self._summable_metrics(),
                                         "models": self.recorder.model_stats.snapshot()})
        except OSError:  # the run directory is gone: the supervisor is shutting down
            pass

    # -- readiness ----------------------------------------------------------------------
    def not_ready_workers(self) -> list[int]:
        """Slots of workers that are not ready (this one included), read from the flags."""
        self._publish()
        return self.flags.not_ready()

    # -- snapshots this worker gives ------------------------------------------------------
    def _families(self) -> list[merge.Family] | None:
        m = self.recorder.metrics
        if m is None:
            return None
        m.settle()  # the refusals the protocol counts as plain ints (shed.py) included
        return merge.families_of(m.registry)

    def _summable_metrics(self) -> list[merge.Family] | None:
        fams = self._families()
        return None if fams is None else [f for f in fams if merge.summable(f[0], f[2])]

    def _state(self) -> dict:
        engine, recorder = self.engine, self.recorder
        return {"slot": self.slot, "pid": os.getpid(),
                "ready": engine.ready and not self.draining,
                "queue_depth": engine.waiting, "inflight": recorder.inflight,
                "executor_restarts": engine.restarts,
                "front_limits": recorder.front.snapshot(),
                "uptime_s": round(time.time() - recorder.started, 3)}

    def _answer(self, kind: str) -> object:
        if kind == "sync":
            return self.services.registrations.sync()  # awaited by the peer server
        if kind == "metrics":
            return self._families()
        if kind == "models":
            return self.recorder.model_stats.snapshot()
        return {"state": self._state(), "window": self.recorder.stats.window()}

    async def sync_peers(self) -> None:
        """Every other worker catches up with the shared custom activations (bounded; a
        silent one catches up at its next sync or start)."""
        peers = [s for s in range(self.count) if s != self.slot]
        await asyncio.gather(*(ask(self.run.socket(s), "sync", SYNC_TIMEOUT_S) for s in peers))

    # -- merged views ---------------------------------------------------------------------
    async def _gather(self, kind: str) -> tuple[dict[int, object], dict[int, dict], list[dict]]:
        """(answers by slot, this one's included; last files of the silent peers; retired)."""
        peers = [s for s in range(self.count) if s != self.slot]
        answers = await asyncio.gather(*(ask(self.run.socket(s), kind) for s in peers))
        got = {s: a for s, a in zip(peers, answers, strict=True) if a is not None}
        got[self.slot] = self._answer(kind)
        if kind == "stats":
            return got, {}, []
        live_files, retired = self.files.read()
        silent = {s: d for s, d in live_files.items() if s not in got}
        return got, silent, retired

    async def metrics(self) -> bytes:
        got, silent, retired = await self._gather("metrics")
        live = [(s, fams) for s, fams in sorted(got.items()) if fams is not None]
        dead = [d["metrics"] for d in [*silent.values(), *retired] if d.get("metrics")]
        return generate_latest(merge.registry_of(merge.merge_families(live, dead)))

    async def model_stats(self, name: str | None) -> dict:
        got, silent, retired = await self._gather("models")
        snaps = [*got.values(), *(d["models"] for d in [*silent.values(), *retired])]
        merged = merge.merge_model_stats(snaps)
        if name is not None:
            merged["model_stats"] = [m for m in merged["model_stats"] if m["name"] == name]
        return merged

    async def stats(self) -> dict:
        got, _, _ = await self._gather("stats")
        windows: dict[str, list] = {}
        for answer in got.values():
            for act, rows in answer["window"].items():
                windows.setdefault(act, []).append(rows)
        workers = sorted((a["state"] for a in got.values()), key=lambda w: w["slot"])
        return {
            "activations": summarize({k: np.concatenate(v) for k, v in windows.items()},
                                     self.settings.metrics_window_s),
            "queue_depth": sum(w["queue_depth"] for w in workers),
            "executor_restarts": sum(w["executor_restarts"] for w in workers),
            "front_limits": front_limits.merged([w.pop("front_limits", None) for w in workers]),
            "workers": workers,
        }
