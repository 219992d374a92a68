"""When to retry and how long to wait. Pure: no clock, no sleeping, no randomness of its own.

Retried: connection failures (nothing or only part of an exchange happened), 503 (queue
full, not ready, draining) and 504 (deadline passed before compute). Activations are pure
functions, so resending is always safe. Never retried: any 4xx, 500, and a timeout while
waiting for the answer (the caller's time budget is spent; a connect timeout is retried).

Wait before retry ``n`` (0-based): the server's ``Retry-After`` when it sent one (seconds or
an HTTP date, at most ``max_retry_after``; a longer hint is not retried at all), otherwise
``min(max_backoff, initial_backoff * 2**n)`` scaled by a random factor in [0.5, 1)
("equal jitter"), so that clients turned away together do not come back together.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from ._exceptions import (
    ActserveError,
    APIConnectionError,
    APITimeoutError,
    DeadlineExceededError,
    OverloadedError,
)

DEFAULT_MAX_RETRIES = 2
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (delta seconds or an HTTP date) -> seconds from ``now`` (a POSIX time:
    the response's ``Date``, see ``response_date``); None if absent or unreadable, or if it
    is a date and there is no ``now`` to count from."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or now is None:
            return None
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def response_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header -> POSIX time; None if absent or unreadable. The server's
    own clock, so a ``Retry-After`` date is read without reading the client's."""
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return None if when is None else when.timestamp()


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = INITIAL_BACKOFF_S
    max_backoff: float = MAX_BACKOFF_S
    max_retry_after: float = MAX_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times must be >= 0 seconds")

    def retryable(self, error: ActserveError) -> bool:
        """Is this kind of error worth another try at all?"""
        if isinstance(error, APITimeoutError):
            return error.phase == "connect"  # nothing was sent yet
        if isinstance(error, OverloadedError):
            return error.retry_after is None or error.retry_after <= self.max_retry_after
        return isinstance(error, (APIConnectionError, DeadlineExceededError))

    def next_delay(self, retries_done: int, error: ActserveError, rand: float) -> float | None:
        """Seconds to wait before the next try, or None to give up and raise ``error``.

        ``retries_done``: retries already made for this call; ``rand`` in [0, 1)."""
        if retries_done >= self.max_retries or not self.retryable(error):
            return None
        hint = getattr(error, "retry_after", None)
        if hint is not None:
            return float(hint)
        base = min(self.max_backoff, self.initial_backoff * (2 ** retries_done))
        return base * (0.5 + 0.5 * rand)
