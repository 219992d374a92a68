"""Request bodies read straight into a worker's arena (``--engine process``).

Before a large binary body is read, the HTTP layer asks for room in the arena
(``RemoteEngine.lend_body``) and reads the body into it; the codec's array is then a view of
that slot, and ``RemoteEngine.submit`` sends the slot's offset to the engine instead of
copying the input into a slot of its own. That is one copy of the tensor fewer per request:
socket buffer -> slot, instead of socket buffer -> joined body -> slot.

Rules that keep this safe:

* lent bodies hold at most half of the arena together, so answers always find room;
* a body is lent only while no request waits for arena room (``submit`` keeps its order);
* a job whose answer finds no room at once gives its lent slot back and takes the usual
  path (its input copied out first), so a lent slot never waits in the backlog: memory
  held by waiting requests could otherwise be the memory everybody waits for;
* a lent slot is freed exactly once: by ``release`` when no job took it (a refused or
  broken request), or with the job's other slot when the engine has answered; either way
  the requests waiting for arena room are looked at again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.engine.ipc.arena import ALIGN, Arena, ArenaFull

SHARE = 0.5  # of the arena that lent bodies may hold together


@dataclass(slots=True, eq=False)
class LentBody:
    """Arena bytes to read one body into; ``release`` once the request is over (a no-op
    when a job took the slot)."""

    view: np.ndarray  # exactly the body's bytes
    slot: int  # the slot's offset in the arena
    slot_bytes: int
    give_back: Callable[[LentBody], None] | None

    def release(self) -> None:
        give_back, self.give_back = self.give_back, None
        if give_back is not None:
            give_back(self)


class Lender:
    def __init__(self, arena: Arena, on_free: Callable[[], None]) -> None:
        self.arena = arena
        self.on_free = on_free  # room came back: requests waiting for it may go on
        self.base = arena.address
        self.limit = int(arena.size * SHARE)
        self.held = 0
        self._lent: list[LentBody] = []

    def lend(self, nbytes: int, tensor_at: int) -> LentBody | None:
        """A slot for a body of ``nbytes`` whose tensor starts ``tensor_at`` bytes in, placed
        so that the tensor starts on a slot boundary; None when it does not fit now."""
        pad = -tensor_at % ALIGN
        need = nbytes + pad
        if self.held + need > self.limit:
            return None
        try:
            slot = self.arena.alloc(need)
        except ArenaFull:
            return None
        self.held += need
        body = LentBody(self.arena.view(slot + pad, nbytes), slot, need, self._give_back)
        self._lent.append(body)
        return body

    def holding(self, array: np.ndarray) -> LentBody | None:
        """The lent body ``array`` is a view of, if any."""
        if not self._lent:
            return None
        at = array.__array_interface__["data"][0] - self.base
        if not 0 <= at < self.arena.size:
            return None
        for body in self._lent:
            if body.slot <= at < body.slot + body.slot_bytes:
                return body
        return None

    def offset(self, array: np.ndarray) -> int:
        """``array``'s offset in the arena (it lies in a lent body)."""
        return array.__array_interface__["data"][0] - self.base

    def adopt(self, body: LentBody) -> None:
        """A job took the slot: it is freed with the job's slots, not by ``release``."""
        body.give_back = None
        self._forget(body)

    def _give_back(self, body: LentBody) -> None:
        self._forget(body)
        self.arena.free(body.slot, body.slot_bytes)
        self.on_free()

    def _forget(self, body: LentBody) -> None:
        self._lent.remove(body)
        self.held -= body.slot_bytes
