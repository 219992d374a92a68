"""Where a custom activation is registered (``POST`` / ``DELETE /v1/activations``,
``--activations-file``): the routes build and validate it (``custom.build``, 400s here)
and hand it to ``services.registrations``, a ``Registrations``: one path whichever engine
runs (``engine.register_custom``, ``unregister_custom``, ``load_file``):

* the inline engine probes, self-tests and serves it in this process;
* the engine process (``RemoteEngine``) is the source of truth: the registration is
  forwarded and its answer awaited, the engine announces the change to every worker, and it
  loads ``--activations-file`` itself.

The model statistics follow through the engine's ``on_custom``. With several inline workers,
``service.process.shared_registrations`` wraps it with files in the instance's run
directory (``create_app``'s ``share_registrations``).
"""

from __future__ import annotations

from service.engine.activations import Activation


class Registrations:
    def __init__(self, engine, model_stats) -> None:
        self.engine = engine
        self.model_stats = model_stats
        engine.on_custom = self._changed

    def _changed(self, name: str, added: bool) -> None:
        (self.model_stats.add if added else self.model_stats.remove)(name)

    async def start(self) -> None:
        """Called once the engine has started, before the server takes requests."""

    async def add(self, raw: object, activation: Activation) -> dict:
        return await self.engine.register_custom(raw, activation)  # 400, 409

    async def remove(self, name: str) -> None:
        await self.engine.unregister_custom(name)  # 404 unknown, 400 built in

    async def load_file(self, path: str) -> list[str]:
        """``--activations-file``: any problem stops start-up with the message."""
        return await self.engine.load_file(path)

    async def sync(self) -> dict:
        return {}  # nothing shared to catch up with


def for_engine(engine, model_stats) -> Registrations:
    return Registrations(engine, model_stats)
