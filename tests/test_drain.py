"""SIGTERM during a burst of new connections: every client sees an answer, a 503 with
``Retry-After``, or a refused connection; never a reset or a connection closed without an
answer."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np
import pytest

from .conftest import subprocess_server

BODY = np.linspace(-1, 1, 256, dtype="<f4").tobytes()
HEADERS = {"content-type": "application/octet-stream"}
CLIENTS = 32


@pytest.mark.slow
def test_burst_of_new_connections_during_drain_sees_no_reset():
    env = {"ACTSERVE_MAX_DELAY_US": "50000"}  # requests stay in flight while it drains
    with subprocess_server(env) as (proc, url):
        async def run() -> tuple[dict, list[str]]:
            outcomes = {"ok": 0, "503": 0, "refused": 0}
            problems: list[str] = []
            warmed = asyncio.Event()
            exited = asyncio.Event()
            limits = httpx.Limits(max_keepalive_connections=0)  # a new connection each time

            async def client() -> None:
                async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
                    while not exited.is_set():
                        try:
                            r = await c.post("/v1/activations/relu", params={"shape": "256"},
                                             content=BODY, headers=HEADERS)
                        except httpx.ConnectError:
                            outcomes["refused"] += 1
                            continue
                        except httpx.TransportError as exc:
                            problems.append(f"{type(exc).__name__}: {exc}")
                            continue
                        if r.status_code == 200:
                            outcomes["ok"] += 1
                        elif r.status_code == 503 and r.headers.get("retry-after"):
                            outcomes["503"] += 1
                        else:
                            problems.append(f"HTTP {r.status_code} {r.headers} {r.text[:200]}")
                        if outcomes["ok"] >= 4 * CLIENTS:
                            warmed.set()

            loop = asyncio.get_running_loop()
            tasks = [asyncio.ensure_future(client()) for _ in range(CLIENTS)]
            await asyncio.wait_for(warmed.wait(), 120)
            proc.send_signal(signal.SIGTERM)
            code = await loop.run_in_executor(None, proc.wait, 60)
            exited.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert code == 0
            return outcomes, problems

        outcomes, problems = asyncio.run(run())
    assert problems == [], (outcomes, problems[:10])
    assert outcomes["ok"] >= 4 * CLIENTS and outcomes["refused"] > 0, outcomes


def test_take_backlog_takes_queued_connections_then_refuses_new_ones():
    import os
    import socket

    from service.http.drain import take_backlog

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    addr = listener.getsockname()
    clients = [socket.create_connection(addr, timeout=5) for _ in range(5)]  # queued, unaccepted
    for i, c in enumerate(clients):
        c.sendall(f"hello {i}".encode())
    dup = os.dup(listener.fileno())
    listener.close()  # the duplicate keeps the listener (and its queue) alive
    taken = take_backlog([dup])
    try:
        assert len(taken) == 5
        assert sorted(conn.recv(16) for conn in taken) == [f"hello {i}".encode() for i in range(5)]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=5)
    finally:
        for s in [*taken, *clients]:
            s.close()
