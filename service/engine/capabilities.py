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


# Inline expressions (``inline.py``) are activations named ``expr:<normalized>``: their
# rows live as long as the expression is in the inline cache, and are neither listed in the
# catalogue nor shared with other processes (each engine checks its own).
INLINE_PREFIX = "expr:"


class Capabilities:
    """Refused combinations and why, by activation name. Bounded by what is registered:
    a custom activation's rows go when it is removed, an inline expression's when the
    inline cache evicts it. The catalogue's sorted list is built once per change, never
    per request."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[tuple, str]] = {}
        self._listed: list[dict] | None = None  # the catalogue's rows, built on demand

    @staticmethod
    def key(name: str, compute_dtype: str, mode: Mode) -> tuple:
        return (name, compute_dtype, mode.amp, mode.amp_dtype, mode.inplace)

    def record(self, failures: dict[tuple, str]) -> None:
        for k, v in failures.items():
            self._by_name.setdefault(k[0], {})[k] = v
            if not k[0].startswith(INLINE_PREFIX):
                self._listed = None

    def forget(self, name: str) -> None:
        """A custom activation was removed (or failed to register), or an inline expression
        left the cache."""
        if self._by_name.pop(name, None) is not None and not name.startswith(INLINE_PREFIX):
            self._listed = None

    def failures(self, everything: bool = False) -> dict[tuple, str]:
        """Every refused combination (key as in ``key``) and why; inline expressions' rows
        only with ``everything`` (they are checked where they run)."""
        return {k: v for name, rows in self._by_name.items()
                if everything or not name.startswith(INLINE_PREFIX) for k, v in rows.items()}

    def check(self, activation: Activation, compute_dtype: str, mode: Mode) -> None:
        if mode.inplace and not activation.supports_inplace:
            raise InvalidRequest(
                f"{activation.name} has no in-place form; send inplace=false "
                "(see GET /v1/activations for which activations have one)"
            )
        rows = self._by_name.get(activation.name)
        reason = rows.get(self.key(activation.name, compute_dtype, mode)) if rows else None
        if reason is not None:
            raise InvalidRequest(
                f"{activation.name} cannot run with compute_dtype={compute_dtype}, "
                f"amp={str(mode.amp).lower()}, inplace={str(mode.inplace).lower()} on this "
                f"server: {reason}"
            )

    def unsupported(self, name: str | None = None) -> list[dict]:
        """The catalogue's rows (no inline expression's), or those of one activation."""
        if name is not None:
            return [_row(k, v) for k, v in sorted(self._by_name.get(name, {}).items(), key=str)]
        if self._listed is None:
            self._listed = [_row(k, v) for k, v in sorted(self.failures().items(), key=str)]
        return list(self._listed)


def _row(k: tuple, reason: str) -> dict:
    return {"activation": k[0], "compute_dtype": k[1], "amp": k[2], "amp_dtype": k[3],
            "inplace": k[4], "reason": reason}
