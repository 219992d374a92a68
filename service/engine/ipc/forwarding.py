"""What the engine process holds for every worker, as one worker forwards and follows it
(docs/engine.md): custom activations (``register``/``unregister``, answered by the engine,
which announces every change to every worker: this worker's registry and capability table
follow) and CUDA shared-memory regions (``cuda_register``/``cuda_unregister``: the engine
opens the handles). After a reconnect everything this worker knows is sent again, since
the engine may be a new one that has none of it; until each is answered the worker is not
ready (``resyncing``)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from functools import partial

from service.engine import custom
from service.engine.activations import Registry
from service.engine.capabilities import Capabilities
from service.engine.ipc import channel, messages
from service.errors import ActserveError, Unavailable

log = logging.getLogger("actserve.engine")


class Forwarding:
    def __init__(self, registry: Registry, capabilities: Capabilities,
                 send: Callable[[object], bool], ids: itertools.count,
                 resynced: Callable[[], None]) -> None:
        self.registry = registry
        self.capabilities = capabilities
        self._send = send  # False when there is no connection
        self._ids = ids
        self._resynced = resynced  # every re-registration is answered
        self.customs: dict[str, object] = {}  # name -> raw registration, as the engine has it
        self.on_custom: Callable[[str, bool], None] | None = None  # (name, added)
        # CUDA region -> its CudaRegister, but for the request id
        self.cuda_handles: dict[str, Callable[[int], messages.CudaRegister]] = {}
        self._requests: dict[int, asyncio.Future] = {}  # awaiting the engine's answer
        self._resync: set[int] = set()  # re-registrations after a reconnect, unanswered

    @property
    def resyncing(self) -> bool:
        return bool(self._resync)

    # -- asking the engine --------------------------------------------------------------
    async def register(self, raw: object) -> dict:
        return await self._ask(partial(messages.Register, raw=raw))

    async def unregister(self, name: str) -> None:
        await self._ask(partial(messages.Unregister, name=name))

    async def open_cuda_region(self, name: str, raw: bytes, device_id: int,
                               byte_size: int) -> None:
        message = partial(messages.CudaRegister, name=name, handle=bytes(raw),
                          device_id=device_id, byte_size=byte_size)
        await self._ask(message)
        self.cuda_handles[name] = message

    async def close_cuda_region(self, name: str) -> None:
        if self.cuda_handles.pop(name, None) is not None:
            await self._ask(partial(messages.CudaUnregister, name=name))

    async def _ask(self, message: Callable[[int], object]):
        """Send ``message(request id)`` and await the engine's ``Registered``."""
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._requests[rid] = future
        try:
            if not self._send(message(rid)):
                raise Unavailable("the engine process is restarting; retry")
            try:
                return await asyncio.wait_for(future, channel.REGISTER_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise Unavailable(f"the engine process did not answer within "
                                  f"{channel.REGISTER_TIMEOUT_S:g} s; retry") from None
        finally:
            self._requests.pop(rid, None)

    # -- what the engine says -----------------------------------------------------------
    def added(self, m: messages.Activation) -> None:
        raw = m.raw
        try:
            act = custom.build(raw)  # no self-test: the engine ran it
        except ActserveError:
            log.exception("the engine announced an activation this process cannot build")
            return
        act.fusion.note = None  # compiled (or not) in the engine process; not shown here
        self.registry.add(act)
        self.customs[act.name] = raw
        if self.on_custom is not None:
            self.on_custom(act.name, True)

    def removed(self, m: messages.Removed) -> None:
        name = m.name
        self.registry.remove(name)
        self.capabilities.forget(name)
        self.customs.pop(name, None)
        if self.on_custom is not None:
            self.on_custom(name, False)

    def registered(self, m: messages.Registered) -> None:
        rid, error_type, message = m.request, m.error_type, m.message
        if rid in self._resync:
            self._resync.discard(rid)
            if error_type not in (None, "conflict"):  # conflict: another worker was first
                log.error("re-registering with the restarted engine failed: %s", message)
            if not self._resync:
                self._resynced()
            return
        future = self._requests.get(rid)
        if future is None or future.done():
            return
        if error_type is None:
            future.set_result(m.entry)
        else:
            future.set_exception(channel.error_from(error_type, message))

    # -- the connection ------------------------------------------------------------------
    def register_again(self) -> None:
        """After a reconnect: the engine may be a new one that has none of them."""
        self._resync = set()
        again = [partial(messages.Register, raw=raw) for raw in self.customs.values()]
        again += self.cuda_handles.values()
        for message in again:
            rid = next(self._ids)
            self._resync.add(rid)
            self._send(message(rid))

    def lost(self, error: Exception) -> None:
        """The connection ended: nothing asked will be answered."""
        self._resync = set()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(error)
