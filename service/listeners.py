"""The server's listening ports, checked before anything starts: the HTTP port and the
gRPC port never collide silently, and a port another process holds is one clear line, not
a traceback from deep inside start-up (``actserve serve`` calls ``problem`` first).
"""

from __future__ import annotations

import errno
import socket

from service.settings import Settings

FLAGS = {"HTTP": "--port (ACTSERVE_PORT)", "gRPC": "--grpc-port (ACTSERVE_GRPC_PORT)",
         "probe": "--probe-port (ACTSERVE_PROBE_PORT)"}


def problem(settings: Settings) -> str | None:
    """Why the server could not listen where its settings say, in one line, or None."""
    port, grpc_port, host = settings.port, settings.grpc_port, settings.host
    if grpc_port and grpc_port == port:
        return (f"the HTTP port and the gRPC port are both {port}: the gRPC listener "
                f"(--grpc-port, default 8001) cannot share the HTTP one (--port); pass "
                f"--grpc-port with another port (e.g. --grpc-port {_other(port)}) or "
                f"--grpc-port 0 to turn gRPC off")
    probe_port = settings.probe_port
    if probe_port and probe_port in (port, grpc_port):
        other = "HTTP" if probe_port == port else "gRPC"
        return (f"the probe port and the {other} port are both {probe_port}: pass "
                f"--probe-port with another port, or 0 to turn the probe port off")
    for kind, number in (("HTTP", port), ("gRPC", grpc_port), ("probe", probe_port)):
        if not number:
            continue  # 0: HTTP picks a free port; gRPC and the probe port are off
        why = _unavailable(host, number)
        if why:
            return f"cannot listen for {kind} on {host}:{number} ({why}); choose another " \
                   f"port with {FLAGS[kind]}" + ("" if kind == "HTTP" else
                                                 f", or 0 to turn the {kind} port off")
    return None


def _other(port: int) -> int:
    return port + 1 if port < 65535 else port - 1


def _unavailable(host: str, port: int) -> str | None:
    """Binds and closes a probe socket the way a listener binds (``SO_REUSEADDR``, no
    ``SO_REUSEPORT``, so another process's listener, even one sharing its port, refuses it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use: another process listens there"
            return exc.strerror or str(exc)
    return None
