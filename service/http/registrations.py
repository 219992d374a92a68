"""Where a custom activation is registered (``POST`` / ``DELETE /v1/activations``,
``--activations-file``): the routes build and validate it (``custom.build``, 400s here)
and hand it to ``services.registrations``, one of:

* ``LocalRegistrations``: the engine in this process (``--engine inline``): probe,
  self-test, serve; the model statistics follow;
* ``RemoteRegistrations``: the engine process (``--engine process``) is the source of
  truth: the registration is forwarded and its answer awaited; the engine announces the
  change to every worker (``RemoteEngine``), and it loads ``--activations-file`` itself;
* with several inline workers, ``service.process.shared_registrations`` wraps the local
  one with files in the instance's run directory.
"""

from __future__ import annotations

from service.engine import custom
from service.engine.activations import Activation
from service.engine.engine import Engine


class LocalRegistrations:
    def __init__(self, engine, model_stats) -> None:
        self.engine = engine
        self.model_stats = model_stats

    async def start(self) -> None:
        """Called once the engine has started, before the server takes requests."""

    async def add(self, raw: object, activation: Activation) -> dict:
        await self.engine.register(activation)  # 400 on a failed self-test, 409 if taken
        self.model_stats.add(activation.name)
        return activation.describe()

    async def remove(self, name: str) -> None:
        self.engine.unregister(name)  # 404 unknown, 400 built in
        self.model_stats.remove(name)

    async def load_file(self, path: str) -> list[str]:
        """``--activations-file``: any problem stops start-up with the message."""
        names = []
        for raw, where in custom.file_entries(path):
            names.append((await self.add(raw, custom.build(raw, where)))["name"])
        return names

    async def sync(self) -> dict:
        return {}  # nothing shared to catch up with


class RemoteRegistrations(LocalRegistrations):
    def __init__(self, engine, model_stats) -> None:
        super().__init__(engine, model_stats)
        engine.on_custom = self._changed

    def _changed(self, name: str, added: bool) -> None:
        (self.model_stats.add if added else self.model_stats.remove)(name)

    async def add(self, raw: object, activation: Activation) -> dict:
        return await self.engine.register_custom(raw)

    async def remove(self, name: str) -> None:
        await self.engine.unregister_custom(name)

    async def load_file(self, path: str) -> list[str]:
        return []  # the engine process loads it and announces its entries


def for_engine(engine, model_stats) -> LocalRegistrations:
    local = isinstance(engine, Engine)  # else a RemoteEngine, which forwards
    return (LocalRegistrations if local else RemoteRegistrations)(engine, model_stats)
