"""A byte budget for large request bodies in flight, granted in arrival order.

Without it, N clients each sending a B-byte body are all read at once: N x B bytes held at
the same time (256 clients x 64 MiB would be 16 GiB: an out-of-memory kill), and since the
bodies arrive interleaved, every one of them finishes late. With it, a large body is read
only once its bytes fit in the budget; the others wait, unread, in their sockets (TCP holds
the sender back), and are taken first come, first served. Bodies under ``SMALL_BYTES`` skip
the budget (the queue limit already bounds them); a body larger than the whole budget is
admitted when it can run alone. A gzip or deflate body is charged again as it inflates,
byte for byte, whatever its compressed size (``charge``). A request that waits longer than
``timeout_s`` (the body deadline: a slow sender holds its share at most that long, and one
below the minimum rate about a second, ``service.http.body``) is refused with 503 and
``Retry-After``, so every waiter gets an answer; one whose own deadline comes first waits
no longer than that: 504 ``deadline_exceeded``, its body never read (it could only have been
read, decoded and then refused at the queue for the same reason).

Event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque

from service.errors import DeadlineExceeded, QueueFull

SMALL_BYTES = 64 * 1024


class _Expired(Exception):
    pass


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class BodyBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0  # bytes of bodies admitted and not yet released
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._inflating: dict[object, None] = {}  # requests inflating, oldest first
        self._room: list[asyncio.Future] = []  # inflating requests waiting for room

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self.held + size <= self.total or self.held == 0

    async def acquire(self, size: int, timeout_s: float = 30.0,
                      deadline_in_s: float | None = None) -> int:
        """Wait until ``size`` bytes may be read; returns the bytes to ``release`` later
        (0 for a small body). ``QueueFull`` (503) after ``timeout_s`` of waiting;
        ``DeadlineExceeded`` (504) after ``deadline_in_s``, the request's own, if sooner."""
        if size < SMALL_BYTES:
            return 0
        if not self._waiters and self._fits(size):
            self.held += size
            return size
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.append((size, fut))
        late = deadline_in_s is not None and deadline_in_s < timeout_s
        timer = loop.call_later(max(0.0, deadline_in_s) if late else timeout_s, _expire, fut)
        try:
            await fut
        except (asyncio.CancelledError, _Expired) as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(size)  # granted just as the waiter went away
            else:
                try:
                    self._waiters.remove((size, fut))
                except ValueError:
                    pass  # already taken off by _grant
                self._grant()  # it may have been the head that held the others back
            if isinstance(exc, _Expired):
                if late:
                    raise DeadlineExceeded(
                        "the request's deadline passed while its body waited for room among "
                        f"the large bodies in flight ({size} bytes, never read)") from None
                raise QueueFull(f"too many large request bodies in flight (waited "
                                f"{timeout_s:g} s for {size} bytes); retry") from None
            raise
        finally:
            timer.cancel()
        return size

    async def charge(self, size: int, key: object) -> None:
        """Take ``size`` more bytes for an admitted request that is inflating its body
        (``key`` names it), waiting while they do not fit; the oldest inflating request
        never waits, so half-inflated bodies cannot wait on each other for ever and memory
        stays under the budget plus one body. Call ``done_inflating(key)`` at the end."""
        if key not in self._inflating:
            self._inflating[key] = None
        loop = asyncio.get_running_loop()
        while self.held + size > self.total and next(iter(self._inflating)) is not key:
            fut = loop.create_future()
            self._room.append(fut)
            try:
                await fut
            finally:
                if fut in self._room:
                    self._room.remove(fut)
        self.held += size

    def done_inflating(self, key: object) -> None:
        if self._inflating.pop(key, 0) is None:
            self._wake()

    def _wake(self) -> None:
        room, self._room = self._room, []
        for fut in room:
            if not fut.done():
                fut.set_result(None)

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            self._wake()
            self._grant()

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.held += size
            fut.set_result(None)
