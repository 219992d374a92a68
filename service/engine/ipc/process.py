"""Starting, watching and restarting an engine process (``host``) from its parent: a
server process that owns its engine, or the supervisor of several workers. Loop side
only: the child is an asyncio subprocess, watched by a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import tempfile

from service.engine.ipc.channel import SETTINGS_ENV
from service.settings import Settings

log = logging.getLogger("actserve.engine")
STOP_GRACE_S = 30.0


def socket_path() -> str:
    return os.path.join(tempfile.gettempdir(),
                        f"actserve-engine-{os.getpid()}-{secrets.token_hex(4)}.sock")


class EngineProcess:
    def __init__(self, settings: Settings, path: str | None = None) -> None:
        self.settings = settings
        self.path = path or socket_path()
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env[SETTINGS_ENV] = self.settings.model_dump_json()
        # The engine lives while its standard input is open: closing it (``stop``) or this
        # process dying makes it drain and exit.
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.engine.ipc.host", self.path, env=env,
            stdin=asyncio.subprocess.PIPE, start_new_session=True)

    async def _watch_loop(self) -> None:
        """Restart the engine when it dies (up to ``executor_restart_limit`` times)."""
        while True:
            code = await self.process.wait()
            if self._stopping:
                return
            log.error("engine process %s exited with %s", self.process.pid, code)
            if self.restarts >= self.settings.executor_restart_limit:
                log.error("engine restart limit (%d) reached; staying not ready",
                          self.settings.executor_restart_limit)
                return
            self.restarts += 1
            await self._spawn()

    async def stop(self) -> None:
        """Close the engine's standard input (it drains and exits), then SIGKILL after the
        grace period."""
        self._stopping = True
        proc = self.process
        if proc is not None and proc.returncode is None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
