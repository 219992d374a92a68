"""Ask the other workers for their snapshots, over one Unix socket per worker.

The supervisor assigns each worker slot a socket path in the instance's run directory
(``RunDir.socket(slot)``, mode 0700 directory). A worker serves its own snapshots there, on
its event loop; another worker connects, writes one request line (``metrics``, ``models``
or ``stats``) and reads one answer: an 8-byte length and the snapshot (``wire.py``). Every call is bounded in
time; a peer that does not answer (dead, restarting) is reported as ``None``.

``sync`` asks a peer to catch up with the shared custom activations
(``shared_registrations.py``); its answer is awaited (self-tests take milliseconds), so
the asker gives it a longer timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections.abc import Callable
from pathlib import Path

from service.process import wire

ASK_TIMEOUT_S = 2.0
_LEN = struct.Struct(">Q")
KINDS = ("metrics", "models", "stats", "sync")


class PeerServer:
    """Answers snapshot requests on ``path``; ``answer(kind)`` runs on the event loop (an
    awaitable answer is awaited)."""

    def __init__(self, path: Path, answer: Callable[[str], object]) -> None:
        self.path = path
        self._answer = answer
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a previous worker of this slot was killed
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind = (await asyncio.wait_for(reader.readline(), ASK_TIMEOUT_S)).decode().strip()
            if kind in KINDS:
                answer = self._answer(kind)
                if inspect.isawaitable(answer):
                    answer = await answer
                payload = wire.dumps(answer)
                writer.write(_LEN.pack(len(payload)))
                writer.write(payload)
                await writer.drain()
        except (OSError, asyncio.TimeoutError, UnicodeDecodeError):
            pass  # the asking worker went away or sent nonsense: nothing to answer
        finally:
            writer.close()


async def ask(path: Path, kind: str, timeout: float = ASK_TIMEOUT_S) -> object | None:
    """One peer's ``kind`` snapshot, or None if it cannot answer within ``timeout``."""
    try:
        return await asyncio.wait_for(_ask(path, kind), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
            struct.error):
        return None


async def _ask(path: Path, kind: str) -> object:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(kind.encode() + b"\n")
        await writer.drain()
        (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        return wire.loads(await reader.readexactly(size))
    finally:
        writer.close()
