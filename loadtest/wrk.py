"""One bounded wrk run: a POST body from a file, every answer compared with the expected
bytes in Lua, and a JSON summary (throughput, latency percentiles, errors, mismatches).

wrk is a C load generator (Debian package ``wrk``). One wrk thread keeps it on one core, so
on a 2-core machine the server under test gets the other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("wrk is not installed: install it with `sudo apt-get install -y wrk` "
                "(Debian/Ubuntu), `brew install wrk` (macOS), or build it from "
                "https://github.com/wg/wrk")

LUA = r"""
local body_file, expect_file, ctype, extra = %(body)s, %(expect)s, %(ctype)s, %(extra)s
local function slurp(p) local f = assert(io.open(p, "rb")); local s = f:read("*a"); f:close(); return s end
wrk.method = "POST"
wrk.body = slurp(body_file)
wrk.headers["Content-Type"] = ctype
for k, v in string.gmatch(extra, "([^\n:]+):([^\n]*)") do wrk.headers[k] = v end
local expected = nil
if expect_file ~= "" then expected = slurp(expect_file) end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) mismatches = 0; first_bad = "" end
function response(status, headers, body)
  if status == 200 and expected ~= nil and body ~= expected then
    mismatches = mismatches + 1
    if first_bad == "" then first_bad = string.sub(body, 1, 200) end
  end
end
function done(summary, latency, requests)
  local bad, sample = 0, ""
  for _, t in ipairs(threads) do
    bad = bad + t:get("mismatches")
    if sample == "" then sample = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"status":%%d,"timeout":%%d,"mismatches":%%d,"lat_mean_us":%%.1f,' ..
    '"lat_max_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"p999_us":%%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bad, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: int  # socket errors, non-2xx answers and timeouts
    mismatches: int  # 200 answers whose body differs from the expected bytes
    mb_per_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _lua(text: str) -> str:
    """A Lua long-bracket string literal."""
    if "]==]" in text:
        raise ValueError(f"cannot quote {text!r} for Lua")
    return "[==[" + text + "]==]"


def available() -> str | None:
    return shutil.which("wrk")


def parse(stdout: str) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")
    d = json.loads(line.removeprefix("WRKJSON "))
    secs = d["duration_us"] / 1e6
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return WrkResult(
        requests=d["requests"], seconds=secs, rps=d["requests"] / secs if secs else 0.0,
        p50_ms=d["p50_us"] / 1e3, p90_ms=d["p90_us"] / 1e3, p99_ms=d["p99_us"] / 1e3,
        p999_ms=d["p999_us"] / 1e3, mean_ms=d["lat_mean_us"] / 1e3, max_ms=d["lat_max_us"] / 1e3,
        errors=errors, mismatches=d["mismatches"],
        mb_per_s=d["bytes"] / secs / 1e6 if secs else 0.0,
    )


def run(url: str, body: bytes, headers: dict, *, connections: int, seconds: float,
        expect: bytes | None = None, timeout_s: float = 30.0, threads: int = 1,
        cpus: set[int] | None = None) -> WrkResult:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections for ``seconds``
    (``cpus``: the cores wrk runs on, else this process's)."""
    exe = available()
    if exe is None:
        raise RuntimeError(INSTALL_HINT)
    ctype = headers.get("Content-Type", "application/octet-stream")
    extra = "\n".join(f"{k}:{v}" for k, v in headers.items() if k != "Content-Type")
    with tempfile.TemporaryDirectory(prefix="actserve-wrk-") as tmp:
        body_path = Path(tmp, "body")
        body_path.write_bytes(body)
        expect_path = ""
        if expect is not None:
            Path(tmp, "expect").write_bytes(expect)
            expect_path = str(Path(tmp, "expect"))
        script = Path(tmp, "post.lua")
        script.write_text(LUA % {"body": _lua(str(body_path)), "expect": _lua(expect_path),
                                 "ctype": _lua(ctype), "extra": _lua(extra)})
        argv = [exe, f"-t{min(threads, connections)}", f"-c{connections}",
                f"-d{max(1, round(seconds))}s", f"--timeout={int(timeout_s)}s", "-s", str(script),
                url]
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=seconds + timeout_s + 30,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return parse(proc.stdout)
