#!/usr/bin/env bash
# Profile actserve's event loop under wrk load with py-spy, and print where the time goes.
#   scripts/bench_profile.sh [URL-PATH-AND-QUERY] [CLIENTS] [SECONDS]
# e.g. scripts/bench_profile.sh "/v1/activations/relu?shape=1024" 64 8
#      PROTOCOL=v2-binary SIZE=1024 scripts/bench_profile.sh "" 64 8   (the sweep's request)
# Needs wrk (apt-get install -y wrk) and py-spy (pip install -e '.[profile]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TARGET=${1:-/v1/activations/relu?shape=1024}
CLIENTS=${2:-64}
SECONDS_=${3:-8}
command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install -y wrk" >&2; exit 2; }
SPY="$(dirname "$PY")/py-spy"
[ -x "$SPY" ] || SPY=$(command -v py-spy) ||
    { echo "py-spy is not installed: $PY -m pip install -e '.[profile]'" >&2; exit 2; }
OUT=${OUT:-loadtest/reports/profile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ACTSERVE_ACCESS_LOG=false ACTSERVE_LOG_LEVEL=warning "$PY" -m service serve --host 127.0.0.1 \
    --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
if [ -n "${PROTOCOL:-}" ]; then
    # PROTOCOL=v2-binary|native-json|... SIZE=N: the request the sweep sends (loadtest/payloads.py)
    TARGET=$("$PY" - "$PROTOCOL" "${SIZE:-1024}" "$OUT" <<'PY'
import sys
from loadtest import payloads
case = payloads.Case(size=int(sys.argv[2]), protocol=sys.argv[1])
req = payloads.build(case, payloads.values(case, 0))
open(f"{sys.argv[3]}/body.bin", "wb").write(req.body)
with open(f"{sys.argv[3]}/headers.lua", "w") as f:
    for k, v in req.headers.items():
        f.write(f'wrk.headers["{k}"] = "{v}"\n')
print(req.path)
PY
)
else
    N=$(echo "$TARGET" | sed -n 's/.*shape=\([0-9]*\).*/\1/p')
    "$PY" -c "import numpy as np,sys; np.linspace(-5,5,int(sys.argv[1]),dtype='<f4').tofile(sys.argv[2])" \
        "${N:-1024}" "$OUT/body.bin"
    echo 'wrk.headers["Content-Type"] = "application/octet-stream"' >"$OUT/headers.lua"
fi
cat >"$OUT/post.lua" <<LUA
wrk.method = "POST"
local f = io.open("$OUT/body.bin", "rb"); wrk.body = f:read("*a"); f:close()
$(cat "$OUT/headers.lua")
LUA
wrk -t1 -c"$CLIENTS" -d"$((SECONDS_ + 2))s" -s "$OUT/post.lua" "http://127.0.0.1:$PORT$TARGET" \
    >"$OUT/wrk.txt" &
WRK=$!
sleep 1
"$SPY" record -r 200 -d "$SECONDS_" -f raw -o "$OUT/pyspy.txt" --pid "$SERVER" >/dev/null 2>&1
wait "$WRK"
grep -E "Requests/sec|Latency" "$OUT/wrk.txt"
"$PY" -m loadtest.profile_summary "$OUT/pyspy.txt" --top 45 | tee "$OUT/summary.txt"
echo "raw profile and summary in $OUT"
