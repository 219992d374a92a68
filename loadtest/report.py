"""The sweep's results as a markdown report and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"native-binary": "tab:blue", "native-json": "tab:orange", "v2-binary": "tab:green",
          "v2-json": "tab:red", "HTTP floor": "black", "naive FastAPI": "tab:gray",
          "HTTP echo": "tab:brown"}
REFERENCE_NAMES = {"floor": "HTTP floor", "naive": "naive FastAPI", "echo": "HTTP echo"}
SIZE_NAMES = {1024: "1K", 4096: "4K", 65536: "64K", 1048576: "1M"}


def _size(n: int) -> str:
    return SIZE_NAMES.get(n, str(n))


def bars_table(rows: list[dict]) -> str:
    lines = ["| performance bar | value | limit | result | measured |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        v = "—" if r["value"] is None else f"{r['value']:.2f}"
        res = {True: "pass", False: "**MISSED**", None: "not measured"}[r["pass"]]
        lines.append(f"| {r['bar']} | {v} | {r['limit']:g} | {res} | {r['detail']} |")
    return "\n".join(lines)


def access_log_rows(cells: list[dict]) -> list[str]:
    """actserve with its defaults (access log on) beside the same server with it off."""
    on = {(c["protocol"], c["size"], c["concurrency"]): c["summary"] for c in cells
          if c["server"] == "actserve" and not c["mode"]}
    rows = []
    for c in cells:
        if c["server"] != "actserve-noaccesslog":
            continue
        a, b = on.get((c["protocol"], c["size"], c["concurrency"])), c["summary"]
        if not a or "error" in a or "error" in b or not b.get("rps"):
            continue
        ca, cb = a.get("cpu_us_per_req"), b.get("cpu_us_per_req")
        cpu = (f"{ca:.0f} | {cb:.0f} | {cb / ca:.2f}" if ca and cb else "— | — | —")
        rows.append(f"| {c['protocol']} {_size(c['size'])} | {c['concurrency']} | "
                    f"{a['rps']:.0f} | {b['rps']:.0f} | {a['rps'] / b['rps']:.2f} | {cpu} |")
    if not rows:
        return []
    return ["## Access log: defaults (on) vs off", "",
            "Server CPU per request (all threads, the log writer's included) is the steadier "
            "figure on a shared machine; off / on is the throughput ratio it implies for a "
            "CPU-bound server.", "",
            "| request | clients | on req/s | off req/s | on / off | on CPU us/req | "
            "off CPU us/req | off / on (CPU) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, ""]


def _cell_rows(cells: list[dict]) -> list[str]:
    lines = ["| cell | req/s (median) | spread | p50 ms | p99 ms | MB/s out | runs | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        s = c["summary"]
        if "error" in s:
            lines.append(f"| {c['key']} | error: {s['error'][:80]} | | | | | | |")
            continue
        spread = f"±{s['rps_spread_pct'] / 2:.0f}%" if s["runs"] > 1 else ""
        errs = s["errors"] + s["mismatches"]
        lines.append(f"| {c['key']} | {s['rps']:.0f} | {spread} | {s['p50_ms']:.3f} | "
                     f"{s['p99_ms']:.3f} | {s['mb_per_s']:.1f} | {s['runs']} | {errs} |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [
        "# actserve benchmark results", "",
        f"- commit `{meta.get('commit', '')}`, {meta['started']}, {meta['cpus']} CPUs, "
        f"Python {meta['python']}, device {meta['device']}, torch threads "
        f"{meta['torch_threads']}",
        f"- {meta['seconds']:g} s per wrk run (1 wrk thread), bar cells repeated "
        f"{meta['repeats']}x in rounds; load average before "
        f"{', '.join(f'{x:.2f}' for x in meta['load_before'])}"
        + (f", after {', '.join(f'{x:.2f}' for x in meta['load_after'])}"
           if "load_after" in meta else ""),
        "- every answer was compared with the reference bit for bit (errors column: non-2xx, "
        "socket errors, timeouts and wrong answers)", "",
        "## Performance bar", "", bars_table(results.get("bars", [])), "",
    ]
    groups = {}
    for c in results["cells"]:
        groups.setdefault(c["group"], []).append(c)
    titles = {"reference": "References (HTTP floor, HTTP echo, naive FastAPI)", "grid": "actserve grid",
              "batching": "Batching off (max_batch_requests=1)",
              "metrics": "Metrics off (--no-metrics)", "modes": "Compute modes",
              "workers": "HTTP workers (--workers 1 and 2)",
              "accesslog": "Access log off (--no-access-log)"}
    for g in ("reference", "grid", "batching", "metrics", "accesslog", "modes", "workers"):
        if g in groups:
            out += [f"## {titles[g]}", "", *_cell_rows(groups[g]), ""]
    out += access_log_rows(results["cells"])
    ip = results.get("inprocess")
    if ip:
        out += ["## In-process (no HTTP)", "",
                "| measurement | value |", "| --- | ---: |",
                f"| memory copy, 64 MiB buffers | {ip['copy_dram']['copy_GBps']:.2f} GB/s |",
                f"| memory copy, 4 MiB buffers (cache) | {ip['copy_cache']['copy_GBps']:.2f} GB/s |"]
        for size, r in ip["raw"].items():
            e = ip["executor"].get(size, {})
            ratio = e.get("elements_per_s", 0) / r["elements_per_s"] if r["elements_per_s"] else 0
            out.append(f"| relu {_size(int(size))} el: raw torch / executor path | "
                       f"{r['elements_per_s'] / 1e6:.0f} / {e.get('elements_per_s', 0) / 1e6:.0f}"
                       f" M el/s ({ratio:.2f}x) |")
        for act, h in ip.get("heavier", {}).items():
            out.append(f"| {act} 1M el: raw torch / executor path | "
                       f"{h['raw_elements_per_s'] / 1e6:.0f} / {h['executor_elements_per_s'] / 1e6:.0f}"
                       f" M el/s ({h['ratio']:.2f}x) |")
        held = ip.get("raw_held", {}).get(str(1 << 20))
        if held:
            out.append(f"| relu 1M el: raw torch, each output held until the next exists | "
                       f"{held['elements_per_s'] / 1e6:.0f} M el/s |")
        for key, label in (("131072x8", "8 x 131,072 el"), ("1048576x4", "4 x 1,048,576 el")):
            if key in ip["executor"]:
                e = ip["executor"][key]
                out.append(f"| executor path, {label} in flight | "
                           f"{e['elements_per_s'] / 1e6:.0f} M el/s |")
        out += ["", "| mode (silu) | ms / request | bytes allocated | output dtype |",
                "| --- | ---: | ---: | --- |"]
        for mode, m in ip.get("modes", {}).items():
            if "error" in m:
                out.append(f"| {mode} | error: {m['error'][:60]} | | |")
            else:
                out.append(f"| {mode} | {m['ms_per_request']:.3f} | {m['allocated_bytes']:,} | "
                           f"{m['out_dtype']} |")
        out.append("")
    lab = results.get("lab")
    if lab:
        out += ["## Lab: a custom activation vs the hand-written composition", "",
                f"`loadtest/lab_bench.py`: a registered `relu(x) * sigmoid(x)` and the built-in "
                f"`relu_sigmoid`, each on the executor's CPU path, one request of "
                f"{lab['elements']:,} float32 elements, 1 intra-op thread (medians).", "",
                "| custom | hand-written | ratio | bar |", "| ---: | ---: | ---: | ---: |",
                f"| {lab['custom_ms']:.3f} ms | {lab['hand_ms']:.3f} ms | {lab['ratio']:.2f}x | "
                f"<= {lab['bar']}x ({'pass' if lab['passed'] else 'missed'}) |", ""]
    rep = results.get("lab_reports")
    if rep:
        out += ["## Lab: what gradients and reports cost", "",
                f"`loadtest/lab_reports_bench.py`: one client, GELU on {rep['elements']:,} float32 "
                f"elements over native binary, two servers side by side (default, and "
                f"`ACTSERVE_ALLOW_PROFILE=true`), medians of {rep['rounds']} rounds.", "",
                "| plain, default | plain, profiles allowed | numerics report | value + grad |",
                "| ---: | ---: | ---: | ---: |",
                f"| {rep['plain_default_ms']:.3f} ms | {rep['plain_profile_allowed_ms']:.3f} ms "
                f"({rep['allowed_vs_default']:.2f}x) | {rep['numerics_ms']:.3f} ms "
                f"({rep['numerics_vs_plain']:.2f}x) | {rep['grad_ms']:.3f} ms "
                f"({rep['grad_vs_plain']:.2f}x) |", ""]
    peaks = results.get("server_rss_peak_bytes") or {}
    if peaks:
        out += ["Server peak RSS: " + ", ".join(
            f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items() if v), ""]
    for p in results.get("plots", []):
        out.append(f"![{Path(p).stem}]({Path(p).name})")
    return "\n".join(out) + "\n"


def _ok(c: dict) -> bool:
    return "error" not in c["summary"]


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cells = [c for c in results["cells"] if _ok(c)]
    plain = [c for c in cells if c["group"] in ("grid", "reference")]
    sizes = sorted({c["size"] for c in plain})
    if sizes:
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.4), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            series: dict[str, list[dict]] = {}
            for c in plain:
                if c["size"] == size:
                    name = REFERENCE_NAMES.get(c["server"], c["protocol"])
                    series.setdefault(name, []).append(c)
            for name, pts in sorted(series.items()):
                pts.sort(key=lambda c: c["concurrency"])
                xs = [p["summary"]["rps"] for p in pts]
                ys = [p["summary"]["p50_ms"] for p in pts]
                style = "--" if name in REFERENCE_NAMES.values() else "-"
                ax.plot(xs, ys, style, marker="o", label=name, color=COLORS.get(name))
                for p, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(f"c{p['concurrency']}", (x, y), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{size:,} float32 elements")
            ax.set_xlabel("throughput (requests/s)")
            ax.set_ylabel("p50 latency (ms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Latency vs throughput (points: concurrent clients)")
        fig.tight_layout()
        written.append(_save(fig, out / "latency_throughput.png", plt))

    modes = [c for c in cells if c["group"] == "modes"]
    ip_modes = results.get("inprocess", {}).get("modes", {})
    if modes or ip_modes:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for conc in sorted({c["concurrency"] for c in modes}):
            pts = [c for c in modes if c["concurrency"] == conc]
            axes[0].bar([f"{c['mode']}\nc{conc}" for c in pts],
                        [c["summary"]["p50_ms"] for c in pts], label=f"{conc} clients")
            axes[1].bar([f"{c['mode']}\nc{conc}" for c in pts],
                        [c["summary"]["rps"] for c in pts], label=f"{conc} clients")
        axes[0].set_ylabel("p50 latency over HTTP (ms)")
        axes[1].set_ylabel("requests/s over HTTP")
        for ax in axes[:2]:
            ax.tick_params(axis="x", labelsize=7)
            if modes:
                ax.legend(fontsize=7)
        names = [m for m, v in ip_modes.items() if "error" not in v]
        axes[2].bar(names, [ip_modes[m]["allocated_bytes"] / 2**20 for m in names],
                    color="tab:green")
        axes[2].set_ylabel("MiB allocated per request (compute)")
        fig.suptitle("Compute dtype, amp and in-place (silu)")
        fig.tight_layout()
        written.append(_save(fig, out / "modes.png", plt))

    batch = [c for c in cells if c["group"] == "batching" or (
        c["server"] == "actserve" and c["protocol"] == "native-binary" and not c["mode"])]
    if any(c["group"] == "batching" for c in batch):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (server, size) in sorted({(c["server"], c["size"]) for c in batch}):
            pts = sorted([c for c in batch if c["server"] == server and c["size"] == size],
                         key=lambda c: c["concurrency"])
            if server == "actserve" and not any(
                    b["size"] == size and b["group"] == "batching" for b in batch):
                continue
            label = ("batching off" if server == "actserve-batch1" else "default batching")
            ax.plot([p["concurrency"] for p in pts], [p["summary"]["rps"] for p in pts],
                    marker="o", linestyle="--" if server == "actserve-batch1" else "-",
                    label=f"{label}, {size:,} el")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s (native binary)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("Batching: max_batch_requests=1 vs default")
        fig.tight_layout()
        written.append(_save(fig, out / "batching.png", plt))

    pairs = [c for c in cells if c["group"] == "metrics"]
    if pairs:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        labels, on, off = [], [], []
        for c in pairs:
            twin = next((d for d in cells if d["server"] == "actserve" and not d["mode"]
                         and (d["protocol"], d["size"], d["concurrency"])
                         == (c["protocol"], c["size"], c["concurrency"])), None)
            if twin is None:
                continue
            labels.append(f"{c['protocol']}\n{_size(c['size'])} c{c['concurrency']}")
            on.append(twin["summary"]["rps"])
            off.append(c["summary"]["rps"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], on, width=0.4, label="metrics on")
        ax.bar([x + 0.2 for x in xs], off, width=0.4, label="metrics off")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("requests/s")
        ax.legend(fontsize=7)
        ax.set_title("Prometheus metrics on vs off")
        fig.tight_layout()
        written.append(_save(fig, out / "metrics.png", plt))
    return written


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
