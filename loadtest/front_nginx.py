"""nginx in front of one actserve as its overload front end, for the overload bench
(``python -m loadtest.overload --front nginx``).

A Python server refuses a request for about a tenth of what serving it costs (the bound in
docs/reliability.md, "Overload"); nginx refuses in C, before the request reaches the
server, for a few microseconds. Here it passes at most ``max_conns`` requests at once to
the server (``limit_conn``, one key for every client: a concurrency limit, Little's law's
way of bounding the wait without a rate to tune) and ``max_large`` of those with bodies of
100,000 bytes and more (a request's cost follows its size: one limit cannot suit both),
and answers the rest 503 at once, JSON in the API's error format with ``Retry-After``. It
accepts every pending connection at each wake-up (``multi_accept``) and keeps its
connections to the server alive, so no request waits unseen in a queue of connections.
The configuration is the deployed one (``deploy/k8s/overlays/nginx-front/nginx.conf``,
shown in docs/deployment.md), its paths and addresses replaced; nginx runs on the server's
cores (they share them, as in the pod). The two limits are in a file the ``location`` includes;
with ``follow`` (the server's ``/v1/stats`` URL) ``scripts/nginx_limits.py`` runs beside
nginx and rewrites them from the server's measured rates (reloading nginx), as a deployment
would run it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts import nginx_limits

from . import servers

ROOT = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)

CONF = ROOT / "deploy" / "k8s" / "overlays" / "nginx-front" / "nginx.conf"


def render(tmp: Path, port: int, upstream: str) -> str:
    """The deployed configuration (``CONF``) with this run's paths and addresses: its pid,
    log, temporary and limits files in ``tmp``, listening on 127.0.0.1:``port``, passing to
    ``upstream``. Each replacement must match once: a change to the file that the bench
    would silently not follow fails here instead."""
    text = CONF.read_text()
    for old, new in (("pid /var/run/nginx/nginx.pid;", f"pid {tmp}/nginx.pid;"),
                     ("error_log /dev/stderr warn;", f"error_log {tmp}/error.log warn;"),
                     ("listen 8080 ", f"listen 127.0.0.1:{port} "),
                     ("server 127.0.0.1:8000;", f"server {upstream};"),
                     ("/etc/nginx/limits/actserve-limits.conf", f"{tmp}/limits.conf")):
        if text.count(old) != 1:
            raise RuntimeError(f"{CONF}: expected {old!r} once")
        text = text.replace(old, new)
    return text.replace("/var/cache/nginx/", f"{tmp}/")


def start(tmp: Path, upstream: str, max_conns: int, max_large: int,
          cpus: set[int] | None = None, follow: str | None = None) -> list[servers.Child]:
    """nginx on a free 127.0.0.1 port in front of ``upstream`` (host:port), pinned to
    ``cpus``, passing at most ``max_conns`` requests with bodies under 100,000 bytes and
    ``max_large`` with larger ones at once; with ``follow`` (a ``/v1/stats`` URL) those
    are the limits until ``scripts/nginx_limits.py``, started beside nginx on ``cpus``,
    puts the server's measured ones in force. The children, nginx first (its URL, its
    output in ``tmp/error.log``; the keeper's in ``tmp/limits.log``)."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed (`apt-get install nginx`; .ci/run does)")
    tmp.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(render(tmp, port, upstream))
    nginx_limits.write(tmp / "limits.conf", nginx_limits.render(
        {"small": max_conns, "large": max_large}, "the bench's --front-conns"))
    argv = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
            "-g", "daemon off;"]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused its configuration: {check.stderr}")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, preexec_fn=pin)
    child = servers.Child("nginx", f"http://127.0.0.1:{port}", proc, tmp / "error.log")
    servers.wait_ready(proc, child.url + "/readyz", 30, "nginx", child.output)
    if follow is None:
        return [child]
    with open(tmp / "limits.log", "wb") as log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "scripts.nginx_limits", "--stats", follow,
             "--out", str(tmp / "limits.conf"), "--nginx-pid", str(tmp / "nginx.pid"),
             "--small", str(max_conns), "--large", str(max_large), "--every", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=pin,
            cwd=ROOT)
    return [child, servers.Child("nginx_limits", "", keeper, tmp / "limits.log")]
