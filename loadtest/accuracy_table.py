"""The accuracy table of every built-in activation (docs/lab.md, "Numerics"): the largest
error, in ULPs of the answer's dtype, against float64 on the fixed grid of
``GET /v1/activations/{name}/accuracy``, per input dtype and AMP setting, on CPU.

    python -m loadtest.accuracy_table            # print the markdown table
    python -m loadtest.accuracy_table --write    # replace the table in docs/lab.md

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
START, END = "<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->"
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
    p.add_argument("--write", action="store_true", help=f"replace the table in {DOC.name}")
    a = p.parse_args(argv)
    table = markdown(sweep_all())
    if not a.write:
        print(table)
        return 0
    text = DOC.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END),
                 lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
    if new == text and START not in text:
        raise SystemExit(f"{DOC} has no {START} marker")
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
