"""The performance bar: ratios of cells measured side by side in one run (medians)."""

from __future__ import annotations

from dataclasses import dataclass

from .client_cells import find

M = 1048576


@dataclass(frozen=True)
class Bar:
    name: str
    kind: str  # "ratio" (a / b >= limit), "p50_gap" (a - b <= limit ms), "tail" (p99/p50 <= limit),
    # "lab" (loadtest/lab_bench.py: custom / hand-written median <= limit),
    # "lab_reports" (loadtest/lab_reports_bench.py: profile-allowed / default p50 <= limit)
    a: tuple | None  # (server, protocol, size, concurrency)
    b: tuple | None
    limit: float


BARS = (
    Bar("native binary 1,024 el, 64 clients >= 0.65 x floor req/s", "ratio",
        ("actserve", "native-binary", 1024, 64), ("floor", "native-binary", 1024, 64), 0.65),
    Bar("v2 binary 1,024 el, 64 clients >= 0.60 x floor req/s", "ratio",
        ("actserve", "v2-binary", 1024, 64), ("floor", "native-binary", 1024, 64), 0.60),
    Bar("native JSON 1,024 el, 64 clients >= 2.5 x naive req/s", "ratio",
        ("actserve", "native-json", 1024, 64), ("naive", "native-json", 1024, 64), 2.5),
    Bar("binary 1,048,576 el, 8 clients >= 0.80 x floor req/s (same body)", "ratio",
        ("actserve", "native-binary", M, 8), ("floor", "native-binary", M, 8), 0.80),
    Bar("JSON 1,048,576 el, 8 clients >= 5 x naive req/s", "ratio",
        ("actserve", "native-json", M, 8), ("naive", "native-json", M, 8), 5.0),
    Bar("1 client, 1,024 el binary: p50 <= floor p50 + 0.5 ms", "p50_gap",
        ("actserve", "native-binary", 1024, 1), ("floor", "native-binary", 1024, 1), 0.5),
    Bar("64 clients, 1,024 el binary: p99 <= 2.5 x p50", "tail",
        ("actserve", "native-binary", 1024, 64), None, 2.5),
    Bar("access log on (the default) >= 0.95 x access log off, native binary 1,024 el, 64 clients",
        "ratio", ("actserve", "native-binary", 1024, 64),
        ("actserve-noaccesslog", "native-binary", 1024, 64), 0.95),
    Bar("executor path, 1,048,576 el per batch >= 0.7 x raw torch", "inprocess", None, None, 0.7),
    Bar("engine process, 1 client, 1,024 el binary: p50 <= inline p50 + 0.3 ms", "p50_gap",
        ("actserve-engine", "native-binary", 1024, 1), ("actserve", "native-binary", 1024, 1),
        0.3),
    Bar("system shared memory 1,048,576 el, 8 clients >= 3 x HTTP binary req/s (SDK)",
        "clients", ("sdk-shm", M, 8), ("sdk-http", M, 8), 3.0),
    Bar("--workers 2 vs 1, binary 1,024 el, 64 clients >= 1.4 x req/s", "ratio",
        ("actserve-workers2", "native-binary", 1024, 64),
        ("actserve-workers1", "native-binary", 1024, 64), 1.4),
    Bar("--workers 2 --engine process vs --workers 1, binary 1,024 el, 64 clients >= 1.2 x",
        "ratio", ("actserve-workers2-engine", "native-binary", 1024, 64),
        ("actserve-workers1", "native-binary", 1024, 64), 1.2),
    Bar("--workers 2 vs 1, binary 1,048,576 el, 8 clients >= 1.3 x req/s", "ratio",
        ("actserve-workers2", "native-binary", M, 8),
        ("actserve-workers1", "native-binary", M, 8), 1.3),
    Bar("lab: custom relu(x) * sigmoid(x) <= 1.3 x hand-written, executor path", "lab",
        None, None, 1.3),
    Bar("lab reports: a plain request on a profile-allowed server <= 1.05 x the default server, p50",
        "lab_reports", None, None, 1.05),
)


def _find(cells: list[dict], key: tuple) -> dict | None:
    for c in cells:
        if (c["server"], c["protocol"], c["size"], c["concurrency"]) == key and not c["mode"]:
            s = c["summary"]
            return None if "error" in s else s
    return None


def evaluate(results: dict) -> list[dict]:
    cells = results.get("cells", [])
    out = []
    for bar in BARS:
        row = {"bar": bar.name, "limit": bar.limit, "value": None, "pass": None, "detail": ""}
        if bar.kind == "clients":
            a = find(results.get("clients", []), *bar.a)
            b = find(results.get("clients", []), *bar.b)
            if a is not None and b is not None and b["rps"]:
                row["value"] = a["rps"] / b["rps"]
                row["detail"] = f"{a['rps']:.0f} vs {b['rps']:.0f} req/s"
        elif bar.kind == "lab":
            lab = results.get("lab")
            if lab and lab.get("hand_ms"):
                row["value"] = lab["custom_ms"] / lab["hand_ms"]
                row["detail"] = (f"{lab['custom_ms']:.3f} vs {lab['hand_ms']:.3f} ms, "
                                 f"{lab['elements']:,} el (medians)")
        elif bar.kind == "lab_reports":
            rep = results.get("lab_reports")
            if rep:
                row["value"] = rep["allowed_vs_default"]
                row["detail"] = (f"{rep['plain_profile_allowed_ms']:.3f} vs "
                                 f"{rep['plain_default_ms']:.3f} ms, {rep['elements']:,} el")
        elif bar.kind == "inprocess":
            ip = results.get("inprocess", {})
            raw = ip.get("raw", {}).get(str(M), {}).get("elements_per_s")
            ex = ip.get("executor", {}).get(str(M), {}).get("elements_per_s")
            if raw and ex:
                row["value"] = ex / raw
                row["detail"] = f"{ex / 1e6:.0f} vs {raw / 1e6:.0f} M el/s"
                held = ip.get("raw_held", {}).get(str(M), {}).get("elements_per_s")
                ex4 = ip.get("executor", {}).get(f"{M}x4", {}).get("elements_per_s")
                if held and ex4:
                    row["detail"] += (f"; 4 in flight {ex4 / 1e6:.0f}; raw with outputs held "
                                      f"{held / 1e6:.0f} ({ex4 / held:.2f}x)")
        else:
            a = _find(cells, bar.a)
            b = _find(cells, bar.b) if bar.b else None
            if a is not None and (b is not None or bar.b is None):
                if bar.kind == "ratio":
                    row["value"] = a["rps"] / b["rps"] if b["rps"] else None
                    row["detail"] = f"{a['rps']:.0f} vs {b['rps']:.0f} req/s"
                    if "server_cores" in a and "server_cores" in b:
                        row["detail"] += (f"; server cores {a['server_cores']:.2f} vs "
                                          f"{b['server_cores']:.2f}, idle cores "
                                          f"{a['idle_cores']:.2f} vs {b['idle_cores']:.2f}")
                    echo = _find(cells, ("echo", *bar.b[1:])) if bar.b[0] == "floor" else None
                    if echo is not None and echo["rps"]:
                        row["detail"] += (f"; echo (same bytes back) {echo['rps']:.0f} req/s, "
                                          f"actserve {a['rps'] / echo['rps']:.2f}x of it")
                elif bar.kind == "p50_gap":
                    row["value"] = a["p50_ms"] - b["p50_ms"]
                    row["detail"] = f"{a['p50_ms']:.3f} vs {b['p50_ms']:.3f} ms"
                elif bar.kind == "tail":
                    row["value"] = a["p99_ms"] / a["p50_ms"] if a["p50_ms"] else None
                    row["detail"] = f"p99 {a['p99_ms']:.2f} ms, p50 {a['p50_ms']:.2f} ms"
        if row["value"] is not None:
            if bar.kind in ("ratio", "inprocess", "clients"):
                row["pass"] = row["value"] >= bar.limit
            else:
                row["pass"] = row["value"] <= bar.limit
        else:
            row["detail"] = "not measured in this run"
        out.append(row)
    return out
