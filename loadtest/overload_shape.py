"""The pure parts of ``locust_overload.py`` (Locust patches the interpreter when imported,
so they live apart for the tests): users per step and a refusal's name."""

from __future__ import annotations

import json


def users_at(run_time: float, capacity: float, steps: list[float],
             step_s: float) -> int | None:
    """Users (one request a second each) for the step ``run_time`` falls in; None after
    the last."""
    i = int(run_time // step_s)
    return None if i >= len(steps) else max(1, round(capacity * steps[i]))


def refusal(status: int, body: bytes | None) -> str:
    """The API's error type of a refusal (``front_limit`` from nginx too), else the status."""
    try:
        return f"{status} {json.loads(body or b'')['error']['type']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}"
