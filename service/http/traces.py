"""Chrome traces of profiled requests (docs/lab.md, "Profiles"), kept for download for a
bounded time and count: ``GET /v1/profiles/{id}``. Torch-free.

One server process keeps them in memory. With ``--workers N`` any worker may receive the
download, so the workers keep them as files in the instance's shared directory
(``traces/`` under ``process/rundir.py``'s directory, removed with it). Either way ``put``
and ``get`` may block on files: callers run them off the event loop.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

MAX_TRACES = 32
_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


class ProfileTraces:
    def __init__(self, ttl_s: float, max_traces: int = MAX_TRACES, clock=time.time,
                 directory: Path | None = None) -> None:
        self.ttl_s = ttl_s
        self.max_traces = max_traces
        self.clock = clock
        self.directory = directory
        self._traces: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    # -- in memory ---------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        while self._traces:
            key, (expires, _) = next(iter(self._traces.items()))
            if expires > now and len(self._traces) <= self.max_traces:
                return
            del self._traces[key]

    # -- as files (workers) ------------------------------------------------------------------
    def _files(self) -> list[tuple[float, Path]]:
        out = []
        for p in self.directory.glob("*.json"):
            try:
                out.append((p.stat().st_mtime, p))
            except FileNotFoundError:  # removed by another worker meanwhile
                pass
        return sorted(out)

    def _expire_files(self, now: float) -> None:
        files = self._files()
        for i, (mtime, path) in enumerate(files):
            if mtime + self.ttl_s > now and len(files) - i <= self.max_traces:
                return
            path.unlink(missing_ok=True)

    # -- the store ---------------------------------------------------------------------------
    def put(self, trace: bytes) -> str:
        """Keep ``trace``; its id (unguessable: the trace shows the request's data)."""
        now = self.clock()
        key = secrets.token_urlsafe(16)
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            tmp = self.directory / f".{key}.tmp"
            tmp.write_bytes(trace)
            os.utime(tmp, (now, now))
            tmp.rename(self.directory / f"{key}.json")
            self._expire_files(now)
            return key
        with self._lock:
            self._traces[key] = (now + self.ttl_s, trace)
            self._expire(now)
        return key

    def get(self, key: str) -> bytes | None:
        now = self.clock()
        if self.directory is not None:
            if not _ID.match(key):
                return None
            path = self.directory / f"{key}.json"
            try:
                if path.stat().st_mtime + self.ttl_s <= now:
                    return None
                return path.read_bytes()
            except FileNotFoundError:
                return None
        with self._lock:
            self._expire(now)
            item = self._traces.get(key)
        return None if item is None else item[1]

    def __len__(self) -> int:
        if self.directory is not None:
            self._expire_files(self.clock())
            return len(self._files()) if self.directory.is_dir() else 0
        with self._lock:
            return len(self._traces)

    def keep(self, reports: dict) -> None:
        """Replace a profile report's trace bytes with where to download them."""
        profile = reports.get("profile")
        if not profile or "trace" not in profile:
            return
        trace = profile.pop("trace")
        if trace is None:
            profile["trace_url"] = None
            return
        profile["trace_url"] = f"/v1/profiles/{self.put(trace)}"
        profile["trace_expires_s"] = self.ttl_s
