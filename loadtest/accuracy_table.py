"""The accuracy table of every built-in activation (docs/lab.md, "Numerics"): the largest
error, in ULPs of the answer's dtype, against float64 on the fixed grid of
``GET /v1/activations/{name}/accuracy``, per input dtype and AMP setting, on CPU.

torch picks its CPU kernels by vector extension, so the table is a property of the kernels
that ran: docs/lab.md keeps one table per platform key (``numerics.platform``: the CPU
capability, the ISA features torch reports, the torch version), each between
``<!-- accuracy-table:start KEY -->`` and ``<!-- accuracy-table:end -->``.

    python -m loadtest.accuracy_table            # print this machine's key and table
    python -m loadtest.accuracy_table --write    # add or replace this key's table in docs/lab.md
    ATEN_CPU_CAPABILITY=avx2 python -m loadtest.accuracy_table --write   # another kernel set

The same computation as the server's route (``numerics.sweep``), run in-process with the
server's compute-thread settings (1 intra-op thread, inference mode).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from service.engine import numerics, selftest
from service.engine.activations import INLINE, Registry
from service.engine.capabilities import Capabilities
from service.engine.compute import DeviceCompute
from service.errors import InvalidRequest

DOC = Path(__file__).resolve().parents[1] / "docs" / "lab.md"
START, END = "<!-- accuracy-table:start", "<!-- accuracy-table:end -->"
BLOCK = re.compile(re.escape(START) + r" (?P<key>[^\n]*?) -->\n(?P<table>.*?)\n" + re.escape(END),
                   re.S)
SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


def sweep_all() -> dict[str, list[dict]]:
    torch.set_num_threads(1)
    registry = Registry()
    compute = DeviceCompute(torch.device("cpu"))
    caps = Capabilities()
    with torch.inference_mode():
        caps.record(selftest.probe(compute, registry))
        out = {}
        for act in registry:
            if act is INLINE:
                continue

            def refuse(wire, mode, act=act):
                try:
                    caps.check(act, wire, mode)
                except InvalidRequest as exc:
                    return str(exc)
                return None

            out[act.name] = numerics.sweep(act, compute.device, refuse)
    return out


def this_platform() -> dict:
    """The platform key of this process's CPU kernels (as ``sweep_all`` runs them)."""
    return numerics.platform(torch.device("cpu"))


def published(text: str) -> dict[str, str]:
    """The tables of docs/lab.md by platform key."""
    return {m["key"]: m["table"].strip() for m in BLOCK.finditer(text)}


def block(key: str, table: str) -> str:
    return f"{START} {key} -->\n{table}\n{END}"


def write(text: str, key: str, table: str) -> str:
    """``text`` with the table of ``key`` replaced, or added after the last table."""
    for m in BLOCK.finditer(text):
        if m["key"] == key:
            return text[:m.start()] + block(key, table) + text[m.end():]
    last = list(BLOCK.finditer(text))
    if not last:
        raise SystemExit(f"{DOC} has no {START} marker")
    end = last[-1].end()
    return text[:end] + "\n\n" + block(key, table) + text[end:]


def _cell(row: dict) -> str:
    if "unsupported" in row:
        return "n/a"
    ulp = row["max_ulp_error"]
    text = f"{ulp:.3g}" if ulp else "0"
    if row["nonfinite_mismatch"]:
        text += f" ({row['nonfinite_mismatch']} non-finite)"
    return f"{text} {SHORT[row['out_dtype']]}"


def markdown(tables: dict[str, list[dict]]) -> str:
    lines = ["| activation | input | AMP off | AMP float16 | AMP bfloat16 | "
             "differ from float32 (AMP off) |",
             "|---|---|---|---|---|---|"]
    for name, rows in tables.items():
        by = {(r["dtype"], r["amp"]): r for r in rows}
        for wire in numerics.WIRE:
            off = by[(wire, "off")]
            differ = off.get("differs_from_float32")
            share = "n/a" if differ is None else f"{differ} / {off['elements']}"
            lines.append(f"| {name} | {wire} | {_cell(off)} | {_cell(by[(wire, 'float16')])} "
                         f"| {_cell(by[(wire, 'bfloat16')])} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true",
                   help=f"add or replace this platform's table in {DOC.name}")
    a = p.parse_args(argv)
    key = this_platform()["key"]
    table = markdown(sweep_all())
    if not a.write:
        print(f"platform: {key}\n{table}")
        return 0
    DOC.write_text(write(DOC.read_text(), key, table))
    print(f"wrote the table of {key!r} in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
