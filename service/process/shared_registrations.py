"""Custom activations shared by several inline workers (``--workers N --engine inline``).

The source of truth is a directory of the instance's run directory (``RunDir.activations``):
one ``<name>.json`` per registration, holding its raw form. A worker that receives
``POST /v1/activations`` (already built and checked: 400s come first):

1. claims the name: the file is written under a temporary name and hard-linked to
   ``<name>.json``, which fails when it exists (409: another worker has it), so a file is
   either absent or whole;
2. registers it in its own engine (probe and self-test); if that fails the file is removed
   and the error answered;
3. asks every other worker to ``sync`` (``peers.py``) and waits for their answers, bounded
   by ``SYNC_TIMEOUT_S``, before it answers 201. A peer that does not answer in time
   catches up at its next sync or at its start.

``sync`` scans the directory: it registers each file this worker lacks (each with its own
self-test) and drops what it registered from a file that is gone (or has changed).
``DELETE`` removes the file, unregisters locally and syncs the peers. A worker that starts
(or is restarted) syncs before it takes requests, and once more when its peer socket is up.
Entries of ``--activations-file`` stay per worker, as every worker loads the file.
Loop side only; the self-tests run in the compute threads (``Engine.register``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from service.engine import custom
from service.engine.activations import Activation
from service.errors import ActserveError, Conflict, UnknownActivation

log = logging.getLogger("actserve")
SYNC_TIMEOUT_S = 30.0  # a peer's sync runs a self-test per new file (milliseconds each)
SUFFIX = ".json"


class SharedRegistrations:
    def __init__(self, local, directory: Path,
                 sync_peers: Callable[[], Awaitable[object]]) -> None:
        self.local = local  # registrations.Registrations: this worker's engine
        self.directory = directory
        self._sync_peers = sync_peers
        self._known: dict[str, bytes] = {}  # name -> the file's bytes this worker serves
        self._refused: dict[str, bytes] = {}  # files this worker could not serve (logged)
        self._lock = asyncio.Lock()

    def _path(self, name: str) -> Path:
        return self.directory / (name + SUFFIX)

    async def start(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        await self.sync()

    async def load_file(self, path: str) -> list[str]:
        return await self.local.load_file(path)  # per worker: each loads the file

    async def add(self, raw: object, activation: Activation) -> dict:
        name = activation.name
        error: Exception | None = None
        async with self._lock:
            if name in self.local.engine.registry:
                raise Conflict(f"activation {name!r} exists; DELETE it first (custom ones only)")
            data = orjson.dumps(raw)
            self._claim(name, data)
            try:
                entry = await self.local.add(raw, activation)
            except Exception as exc:  # noqa: BLE001 - answered after the peers heard it
                self._path(name).unlink(missing_ok=True)
                error = exc
            else:
                self._known[name] = data
        await self._sync_peers()  # outside the lock: a peer may be asking this one to sync
        if error is not None:
            raise error
        return entry

    def _claim(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        try:
            os.link(tmp, self._path(name))
        except FileExistsError:
            raise Conflict(f"activation {name!r} exists (registered on another worker); "
                           "DELETE it first") from None
        finally:
            tmp.unlink(missing_ok=True)

    async def remove(self, name: str) -> None:
        async with self._lock:
            path = self._path(name)
            shared = name in self._known or path.exists()
            if not shared:
                await self.local.remove(name)  # 404 unknown, 400 built in, or a file entry
                return
            path.unlink(missing_ok=True)
            if self._known.pop(name, None) is not None:
                await self.local.remove(name)
        await self._sync_peers()

    async def sync(self) -> dict:
        """Serve what the directory holds, and only that (of what came from it)."""
        async with self._lock:
            files = {p.name[:-len(SUFFIX)]: p for p in self.directory.glob("*" + SUFFIX)
                     if not p.name.startswith(".")}
            for name in [n for n in self._known if n not in files]:
                await self._drop(name)
            for name, path in sorted(files.items()):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if self._known.get(name) == data or self._refused.get(name) == data:
                    continue
                if name in self._known:
                    await self._drop(name)  # replaced since this worker registered it
                try:
                    raw = orjson.loads(data)
                    await self.local.add(raw, custom.build(raw, path.name))
                except (ActserveError, orjson.JSONDecodeError) as exc:
                    log.warning("worker %d: cannot serve %s: %s", os.getpid(), path.name, exc)
                    self._refused[name] = data
                    continue
                self._known[name] = data
            return {"activations": sorted(self._known)}

    async def _drop(self, name: str) -> None:
        self._known.pop(name, None)
        with contextlib.suppress(UnknownActivation):
            await self.local.remove(name)
