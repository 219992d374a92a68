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
The configuration is the one docs/deployment.md shows; nginx runs on the server's cores
(they share them, as in a pod). The two limits are in a file the ``location`` includes;
with ``follow`` (the server's ``/v1/stats`` URL) ``scripts/nginx_limits.py`` runs beside
nginx and rewrites them from the server's measured rates (reloading nginx), as a deployment
would run it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts import nginx_limits

from . import servers

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)

CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # two classes by declared size, each with its own limit (an empty key is not counted)
    map $http_content_length $actserve_small {{ "~^[0-9]{{1,5}}$" s; default ""; }}
    map $http_content_length $actserve_large {{ "~^[0-9]{{6,}}$" l; default ""; }}
    limit_conn_zone $actserve_small zone=actserve_small:1m;
    limit_conn_zone $actserve_large zone=actserve_large:1m;
    upstream actserve {{
        server {upstream};
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 64m;
        client_body_buffer_size 4m;
        keepalive_requests 1000000;
        location / {{
            include {tmp}/limits.conf;
            limit_conn_status 503;
            limit_conn_log_level info;
            error_page 503 = @overloaded;
            proxy_pass http://actserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering on;
            proxy_max_temp_file_size 0;
        }}
        location @overloaded {{
            default_type application/json;
            add_header Retry-After 1 always;
            return 503 '{answer}';
        }}
    }}
}}
"""


def render(tmp: Path, port: int, upstream: str, max_conns: int, max_large: int) -> str:
    """nginx's configuration; the limits go in ``tmp/limits.conf`` (``nginx_limits``)."""
    answer = json.dumps({"error": {"type": "front_limit", "message": (
        "the server is at its limit of requests in flight; retry later")}},
        separators=(",", ":"))
    return CONF.format(tmp=tmp, port=port, upstream=upstream,
                       keepalive=max(64, 2 * (max_conns + max_large)), answer=answer)


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
    conf.write_text(render(tmp, port, upstream, max_conns, max_large))
    nginx_limits.write(tmp / "limits.conf", nginx_limits.render(
        {"small": max_conns, "large": max_large}, "the bench's --front-conns"))
    argv = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
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
            cwd=Path(__file__).resolve().parent.parent)
    return [child, servers.Child("nginx_limits", "", keeper, tmp / "limits.log")]
