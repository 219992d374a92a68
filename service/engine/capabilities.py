"""Which (activation, compute dtype, amp, in-place) combinations run on the configured
devices.

The table is filled once at start-up by the probe (``selftest.probe``, run by the pool in
each executor's compute thread); the event loop only looks it up, so an unsupported
combination is a 400 naming why, before anything is queued, and never a 500.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.job import Mode
from service.errors import InvalidRequest

if TYPE_CHECKING:
    from service.engine.activations import Activation


class Capabilities:
    def __init__(self) -> None:
        self._failures: dict[tuple, str] = {}

    @staticmethod
    def key(name: str, compute_dtype: str, mode: Mode) -> tuple:
        return (name, compute_dtype, mode.amp, mode.amp_dtype, mode.inplace)

    def record(self, failures: dict[tuple, str]) -> None:
        self._failures.update(failures)

    def forget(self, name: str) -> None:
        """A custom activation was removed (or failed to register)."""
        self._failures = {k: v for k, v in self._failures.items() if k[0] != name}

    def failures(self) -> dict[tuple, str]:
        """Every refused combination (key as in ``key``) and why."""
        return dict(self._failures)

    def check(self, activation: Activation, compute_dtype: str, mode: Mode) -> None:
        if mode.inplace and not activation.supports_inplace:
            raise InvalidRequest(
                f"{activation.name} has no in-place form; send inplace=false "
                "(see GET /v1/activations for which activations have one)"
            )
        reason = self._failures.get(self.key(activation.name, compute_dtype, mode))
        if reason is not None:
            raise InvalidRequest(
                f"{activation.name} cannot run with compute_dtype={compute_dtype}, "
                f"amp={str(mode.amp).lower()}, inplace={str(mode.inplace).lower()} on this "
                f"server: {reason}"
            )

    def unsupported(self) -> list[dict]:
        return [
            {"activation": k[0], "compute_dtype": k[1], "amp": k[2], "amp_dtype": k[3],
             "inplace": k[4], "reason": v}
            for k, v in sorted(self._failures.items(), key=str)
        ]
