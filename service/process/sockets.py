"""The listening port of a multi-process server.

Each worker listens on its own ``SO_REUSEPORT`` socket bound to the same address, and the
kernel spreads new connections over the listening sockets. The supervisor chooses and holds
the port:

1. it binds a plain socket (no ``SO_REUSEPORT``) to ``host:port``; if anything already
   listens there, even another actserve, start-up fails with "address in use" instead of
   silently sharing the port (``port=0`` picks a free port here);
2. it closes that probe and binds a ``SO_REUSEPORT`` socket to the same port, which it keeps,
   bound but never listening, for its whole life: the port stays reserved while workers
   come and go (a bound socket that does not listen receives no connections), and no
   process without ``SO_REUSEPORT`` (nor any other user's) can take it.
"""

from __future__ import annotations

import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuseport_socket(host: str, port: int, *, reuse_addr: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if reuse_addr:  # only for listeners: SO_REUSEADDR would let others share a bound socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """The supervisor's reservation (bound, not listening); its port is the server's."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    return reuseport_socket(host, port, reuse_addr=False)


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's own socket for the port's ``SO_REUSEPORT`` group, bound but not yet
    listening: uvicorn calls ``listen`` once the app has started (warm-up and self-test
    done), so the kernel hands a worker no connection before it can serve."""
    sock = reuseport_socket(host, port, reuse_addr=True)
    sock.setblocking(False)
    return sock
