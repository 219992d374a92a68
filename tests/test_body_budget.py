"""The byte budget for large request bodies: granted in arrival order, small bodies never
wait, an oversized body runs alone, a waiter that goes away frees its turn; and on a real
server, bodies beyond the budget wait unread until earlier ones are answered."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.errors import DeadlineExceeded, QueueFull
from service.exchange.budget import SMALL_BYTES, BodyBudget

from .conftest import reference, same_bits, serve
from .gates import block_executor, submissions, wait_for

MB = 1 << 20


def test_grants_in_arrival_order_and_small_bodies_never_wait():
    async def run():
        budget = BodyBudget(3 * MB)
        assert await budget.acquire(2 * MB) == 2 * MB
        order = []

        async def claim(name, size):
            got = await budget.acquire(size)
            order.append(name)
            return got

        big = asyncio.ensure_future(claim("big", 2 * MB))  # does not fit: waits
        await asyncio.sleep(0)
        later = asyncio.ensure_future(claim("later", MB))  # would fit, but queues behind big
        await asyncio.sleep(0)
        assert budget.waiting == 2 and order == []
        assert await budget.acquire(SMALL_BYTES - 1) == 0  # small: straight through
        budget.release(2 * MB)
        assert await big == 2 * MB and await later == MB
        assert order == ["big", "later"] and budget.held == 3 * MB

    asyncio.run(run())


def test_a_body_larger_than_the_budget_runs_alone():
    async def run():
        budget = BodyBudget(MB)
        huge = await budget.acquire(5 * MB)  # nothing else held: admitted
        waiter = asyncio.ensure_future(budget.acquire(SMALL_BYTES))
        await asyncio.sleep(0)
        assert not waiter.done()
        budget.release(huge)
        assert await waiter == SMALL_BYTES

    asyncio.run(run())


def test_a_waiter_that_goes_away_frees_its_turn():
    async def run():
        budget = BodyBudget(MB)
        first = await budget.acquire(MB)
        gone = asyncio.ensure_future(budget.acquire(MB))
        behind = asyncio.ensure_future(budget.acquire(SMALL_BYTES))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        budget.release(first)
        assert await behind == SMALL_BYTES and budget.held == SMALL_BYTES and budget.waiting == 0

    asyncio.run(run())


def test_a_waiter_past_its_deadline_gets_503_and_the_queue_moves_on():
    async def run():
        budget = BodyBudget(MB)
        first = await budget.acquire(MB)
        with pytest.raises(QueueFull) as info:
            await budget.acquire(MB, timeout_s=0.01)
        assert info.value.status == 503 and "retry" in str(info.value)
        assert budget.waiting == 0 and budget.held == MB
        budget.release(first)
        assert await budget.acquire(MB, timeout_s=0.01) == MB

    asyncio.run(run())


def test_a_waiter_whose_own_deadline_comes_first_gets_504_at_it_and_the_queue_moves_on():
    """A request's deadline before the body timeout: it waits no longer than that, and is
    answered 504 (its body never read) instead of being read, decoded and refused later."""
    async def run():
        budget = BodyBudget(MB)
        first = await budget.acquire(MB)
        with pytest.raises(DeadlineExceeded) as info:
            await budget.acquire(MB, timeout_s=30.0, deadline_in_s=0.01)
        assert info.value.status == 504 and "never read" in str(info.value)
        assert budget.waiting == 0 and budget.held == MB
        # a deadline already past: refused at once; one beyond the body timeout: the 503
        with pytest.raises(DeadlineExceeded):
            await budget.acquire(MB, timeout_s=30.0, deadline_in_s=-1.0)
        with pytest.raises(QueueFull):
            await budget.acquire(MB, timeout_s=0.01, deadline_in_s=30.0)
        budget.release(first)
        assert await budget.acquire(MB, timeout_s=0.01, deadline_in_s=0.01) == MB  # room

    asyncio.run(run())


def test_bodies_beyond_the_budget_wait_unread_then_all_are_answered():
    n = 65_536  # 256 KiB bodies; the budget holds one at a time
    xs = [np.full(n, i - 1.5, dtype="<f4") for i in range(3)]
    with serve(max_body_bytes_in_flight=300_000) as srv:
        rt = srv.engine
        base = submissions(rt).count

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                gate = block_executor(rt)
                try:
                    tasks = [asyncio.ensure_future(c.post(
                        "/v1/activations/relu", params={"shape": str(n)}, content=x.tobytes(),
                        headers={"content-type": "application/octet-stream"})) for x in xs]
                    # one body read and queued; the other two wait for the budget, unread
                    await wait_for(lambda: submissions(rt).count - base == 1 and
                                   srv.services.bodies.waiting == 2)
                    assert srv.services.bodies.held == n * 4
                    metrics = (await c.get("/metrics")).text
                    assert "actserve_body_waiting_requests 2.0" in metrics
                    # one more behind them with timeout=0.3: 504 at its deadline, unread
                    late = await c.post(
                        "/v1/activations/relu", params={"shape": str(n), "timeout": "0.3"},
                        content=xs[0].tobytes(),
                        headers={"content-type": "application/octet-stream"})
                    assert late.status_code == 504, late.text
                    assert late.json()["error"]["type"] == "deadline_exceeded"
                    assert "never read" in late.json()["error"]["message"]
                    assert srv.services.bodies.waiting == 2
                finally:
                    gate.set()
                return await asyncio.gather(*tasks)

        rs = asyncio.run(run())
        assert srv.services.bodies.held == 0 and srv.services.bodies.waiting == 0
    for x, r in zip(xs, rs, strict=True):
        assert r.status_code == 200, r.text
        assert same_bits(np.frombuffer(r.content, "<f4"), reference("relu", x, "float32")[0])

