"""A byte budget for large request bodies in flight, granted in arrival order.

Without it, N clients each sending a B-byte body are all read at once: N x B bytes held at
the same time (256 clients x 64 MiB would be 16 GiB: an out-of-memory kill), and since the
bodies arrive interleaved, every one of them finishes late. With it, a large body is read
only once its bytes fit in the budget; the others wait, unread, in their sockets (TCP holds
the sender back), and are taken first come, first served. Bodies under ``SMALL_BYTES`` skip
the budget (the queue limit already bounds them); a body larger than the whole budget is
admitted when it can run alone.

Event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque

SMALL_BYTES = 64 * 1024


class BodyBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0  # bytes of bodies admitted and not yet released
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self.held + size <= self.total or self.held == 0

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes may be read; returns the bytes to ``release`` later
        (0 for a small body)."""
        if size < SMALL_BYTES:
            return 0
        if not self._waiters and self._fits(size):
            self.held += size
            return size
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((size, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(size)  # granted just as the waiter went away
            else:
                try:
                    self._waiters.remove((size, fut))
                except ValueError:
                    pass  # already taken off by _grant
                self._grant()  # it may have been the head that held the others back
            raise
        return size

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            self._grant()

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.held += size
            fut.set_result(None)
