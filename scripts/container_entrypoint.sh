#!/bin/sh
# The container's entrypoint (Dockerfile ENTRYPOINT); CI runs the same script outside a
# container (tests/test_deploy_install.py).
#
#   container_entrypoint.sh [serve] [FLAGS...]   exec the server (PID 1 gets SIGTERM and drains)
#   container_entrypoint.sh healthcheck          exit 0 when /readyz answers 200 (HEALTHCHECK;
#                                                the probe port when ACTSERVE_PROBE_PORT is set)
#   container_entrypoint.sh COMMAND...           exec anything else (a shell, for debugging)
#
# Settings come from ACTSERVE_* environment variables (see docs/deployment.md); inside a
# container the server listens on ACTSERVE_HOST=0.0.0.0, set by the Dockerfile.
set -eu

case "${1:-serve}" in
    serve)
        [ "$#" -gt 0 ] && shift
        exec actserve serve "$@"
        ;;
    healthcheck)
        exec python -c '
import os, sys, urllib.request
port = os.environ.get("ACTSERVE_PROBE_PORT", "0")  # the probe port when it is on
if port in ("", "0"):
    port = os.environ.get("ACTSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=float(os.environ.get("ACTSERVE_HEALTHCHECK_TIMEOUT_S", "2"))) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
'
        ;;
    -*)
        exec actserve serve "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
