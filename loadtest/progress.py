"""The load test's progress line (``loadtest/locustfile.py``), apart from Locust so that it
can be tested without gevent's monkey-patching."""

from __future__ import annotations


def progress_line(total, elapsed: float, since: tuple[int, float] = (0, 0.0)) -> str:
    """One progress line; the rate is measured over the interval since the last line
    (``since``: its request count and time), not Locust's ``current_rps``, which reads 0.0
    until a whole window of seconds has been counted."""
    p50 = total.get_response_time_percentile(0.5) if total.num_requests else 0
    p99 = total.get_response_time_percentile(0.99) if total.num_requests else 0
    span = elapsed - since[1]
    rate = (total.num_requests - since[0]) / span if span > 0 else 0.0
    return (f"[{elapsed:6.1f}s] {total.num_requests} requests, {total.num_failures} failures, "
            f"{rate:.1f} req/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
