"""Chrome traces of profiled requests (docs/lab.md, "Profiles"), kept for download for a
bounded time and count: ``GET /v1/profiles/{id}``. Torch-free; event loop only."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

MAX_TRACES = 32


class ProfileTraces:
    def __init__(self, ttl_s: float, max_traces: int = MAX_TRACES, clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_traces = max_traces
        self._traces: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._traces:
            key, (expires, _) = next(iter(self._traces.items()))
            if expires > now and len(self._traces) <= self.max_traces:
                return
            del self._traces[key]

    def put(self, trace: bytes) -> str:
        """Keep ``trace``; its id (unguessable: the trace shows the request's data)."""
        now = self.clock()
        key = secrets.token_urlsafe(16)
        self._traces[key] = (now + self.ttl_s, trace)
        self._expire(now)
        return key

    def get(self, key: str) -> bytes | None:
        self._expire(self.clock())
        item = self._traces.get(key)
        return None if item is None else item[1]

    def __len__(self) -> int:
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
