"""Time ``GET /readyz`` as an orchestrator asks it, from a process of its own.

The overload bench's generator runs on a loop that falls behind under its own load (it
reports how far: ``client_lag_ms``); a prober on that loop counts the generator's lag in
the server's answer time. This process does nothing else: one thread a port, each asking
every ``--interval`` seconds and timing the exchange from its start (the connect included
where one is made) to the answer's end. ``--api-port``: a kept-alive connection, opened
again (in the time counted) when the other end closes it, as a load balancer's health
check would; ``--probe-port``: a new HTTP/1.0 connection each time, as the kubelet asks.
Each asks at least once; it runs until its standard input closes, then prints
``{"api": [...], "probe": [...], "error": ...}`` (seconds) as one JSON line and exits; a
probe answered other than 200 on the probe port, or a failed exchange, ends its thread
with the reason in ``"error"``.

    python -m loadtest.probe_timer --api-port 8000 --probe-port 8002 < /dev/null
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time


def _answer(sock: socket.socket, until_close: bool) -> tuple[bytes, bool]:
    """(the status line, whether the server closes) of one answer read whole."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before an answer")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if until_close:
        while sock.recv(65536):
            pass
        return lines[0], True
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-answer")
        body += chunk
    return lines[0], close


def keepalive_probe(host: str, port: int, interval: float, stop: threading.Event,
                    out: list[float]) -> None:
    raw = f"GET /readyz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    sock: socket.socket | None = None
    while True:  # at least once
        t0 = time.perf_counter()
        for attempt in (0, 1):
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=60)
                sock.sendall(raw)
                _, close = _answer(sock, until_close=False)
                break
            except (ConnectionError, OSError):  # closed while idle (a front end's reload)
                if sock is not None:
                    sock.close()
                sock = None
                if attempt:
                    raise
        if close:
            sock.close()
            sock = None
        out.append(time.perf_counter() - t0)
        if stop.wait(interval):
            break
    if sock is not None:
        sock.close()


def fresh_probe(host: str, port: int, interval: float, stop: threading.Event,
                out: list[float], errors: list[str]) -> None:
    raw = b"GET /readyz HTTP/1.0\r\n\r\n"
    while True:  # at least once
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=60) as sock:
            sock.sendall(raw)
            status, _ = _answer(sock, until_close=True)
        if status.split(b" ")[1:2] != [b"200"]:
            errors.append(status.decode("latin-1"))
            return
        out.append(time.perf_counter() - t0)
        if stop.wait(interval):
            break


def _reporting(target, errors: list[str], *args) -> None:
    """``target(*args)``, its failure kept in ``errors`` (the bench raises it)."""
    try:
        target(*args)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=0)
    p.add_argument("--probe-port", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.1)
    a = p.parse_args(argv)
    stop = threading.Event()
    times: dict[str, list[float]] = {"api": [], "probe": []}
    errors: list[str] = []
    threads = []
    if a.api_port:
        threads.append(threading.Thread(target=_reporting, daemon=True, args=(
            keepalive_probe, errors, a.host, a.api_port, a.interval, stop, times["api"])))
    if a.probe_port:
        threads.append(threading.Thread(target=_reporting, daemon=True, args=(
            fresh_probe, errors, a.host, a.probe_port, a.interval, stop, times["probe"],
            errors)))
    for t in threads:
        t.start()
    sys.stdin.read()  # until the bench closes it
    stop.set()
    for t in threads:
        t.join(60)
    print(json.dumps({**times, "error": errors[0] if errors else None}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
