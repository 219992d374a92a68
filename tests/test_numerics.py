"""The numerics report and the accuracy table (docs/lab.md) against the test's own float64
computation (numpy formulas, Python's math for the ULP spacing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from service import dtypes
from service.engine.compute import TORCH_DTYPES

from .conftest import reference, wire_values

VALUES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -3e-42, 6e-8, 1e-3, -0.3, 0.7,
          2.5, -7.0, 11.0, 30.0, -30.0, 1000.0, 65504.0]
BITS = {"float16": (10, -14), "bfloat16": (7, -126), "float32": (23, -126),
        "float64": (52, -1022)}
EXACT = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def spacing(r: float, dtype: str) -> float:
    bits, emin = BITS[dtype]
    a = min(abs(r), float(torch.finfo(TORCH_DTYPES[dtype]).max))
    e = emin if a == 0 else max(math.floor(math.log2(a)), emin)
    return 2.0 ** (e - bits)


def expected(name: str, wire: str, out: np.ndarray, out_dtype: str, x: np.ndarray) -> dict:
    xs = dtypes.to_float(x, wire).astype(np.float64)
    with np.errstate(all="ignore"):
        exact = EXACT[name](xs)
    ys = dtypes.to_float(out, out_dtype).astype(np.float64)
    abs_err = ulp_err = 0.0
    mismatch = 0
    for y, r in zip(ys, exact, strict=True):
        if math.isfinite(y) and math.isfinite(r):
            abs_err = max(abs_err, abs(y - r))
            ulp_err = max(ulp_err, abs(y - r) / spacing(r, out_dtype))
        elif not ((math.isnan(y) and math.isnan(r)) or y == r):
            mismatch += 1
    return {"max_abs_error": abs_err, "max_ulp_error": ulp_err, "nonfinite_mismatch": mismatch}


def counts(values: np.ndarray, dtype: str) -> dict:
    f = dtypes.to_float(values, dtype).astype(np.float64)
    tiny = float(torch.finfo(TORCH_DTYPES[dtype]).tiny)
    return {"nan": int(np.isnan(f).sum()), "posinf": int((f == np.inf).sum()),
            "neginf": int((f == -np.inf).sum()),
            "subnormal": int(((f != 0) & (np.abs(f) < tiny)).sum())}


CASES = [("sigmoid", "float16", None, False, None), ("tanh", "bfloat16", None, False, None),
         ("elu", "float32", None, True, "bfloat16"), ("silu", "float32", "float16", False, None),
         ("relu", "float64", None, False, None), ("sigmoid", "float32", None, False, None)]


@pytest.mark.parametrize(("name", "wire", "compute", "amp", "amp_dtype"), CASES)
def test_numerics_report_agrees_with_float64(app_client, name, wire, compute, amp, amp_dtype):
    x = wire_values(VALUES, wire)
    body = {"data": dtypes.to_float(x, wire).tolist(), "dtype": wire, "amp": amp,
            "report": ["numerics"]}
    if compute:
        body["compute_dtype"] = compute
    if amp_dtype:
        body["amp_dtype"] = amp_dtype
    r = app_client.post(f"/v1/activations/{name}", content=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    got = r.json()
    rep = got["report"]["numerics"]
    out, out_dtype = reference(name, x, wire, compute_dtype=compute, amp=amp,
                               amp_dtype=amp_dtype)
    assert rep["dtype"] == out_dtype == got["dtype"]
    want = expected(name, wire, out, out_dtype, x)
    assert rep["max_abs_error"] == pytest.approx(want["max_abs_error"], rel=1e-6, abs=1e-300)
    assert rep["max_ulp_error"] == pytest.approx(want["max_ulp_error"], rel=1e-6, abs=1e-9)
    assert rep["nonfinite_mismatch"] == want["nonfinite_mismatch"]
    assert rep["input"] == counts(x, wire)
    assert rep["output"] == counts(out, out_dtype)
    f32, _ = reference(name, x, wire, compute_dtype="float32")
    f32_out = dtypes.from_float(dtypes.to_float(f32, "float32"), out_dtype)
    a = dtypes.to_float(out, out_dtype)
    b = dtypes.to_float(f32_out, out_dtype)
    differ = int((~((a == b) | (np.isnan(a) & np.isnan(b)))).sum())
    assert rep["differs_from_float32"] == differ
    if out_dtype == "float16" and name != "relu":
        assert rep["max_ulp_error"] > 0  # a half-precision answer is not exact


def test_numerics_over_binary_and_v2(app_client):
    x = wire_values(VALUES, "float16")
    r = app_client.post("/v1/activations/tanh", content=x.tobytes(),
                    params={"shape": str(x.size), "dtype": "float16", "report": "numerics"},
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    rep = json.loads(r.headers["x-report-numerics"])
    assert rep["dtype"] == "float16" and rep["input"]["nan"] == 1
    assert r.headers["x-outputs"] == "value" and len(r.content) == x.nbytes
    head = json.dumps({"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP16",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"report": "numerics", "binary_data_output": True}}).encode()
    r2 = app_client.post("/v2/models/tanh/infer", content=head + x.tobytes(),
                     headers={"Inference-Header-Content-Length": str(len(head))})
    assert r2.status_code == 200, r2.text
    n = int(r2.headers["inference-header-content-length"])
    meta = json.loads(r2.content[:n])
    assert json.loads(meta["parameters"]["report_numerics"]) == rep
    assert r2.content[n:] == r.content


def test_accuracy_table(app_client):
    r = app_client.get("/v1/activations/sigmoid/accuracy")
    assert r.status_code == 200, r.text
    table = r.json()
    rows = {(row["dtype"], row["amp"]): row for row in table["rows"]}
    assert set(rows) == {(w, a) for w in ("float16", "bfloat16", "float32", "float64")
                         for a in ("off", "float16", "bfloat16")}
    assert rows[("float64", "off")]["max_ulp_error"] == 0
    # the table names the kernels that produced it: torch picks them by vector extension
    assert table["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert table["platform"]["torch"] == torch.__version__
    assert table["platform"]["key"].startswith(f"cpu {torch.backends.cpu.get_cpu_capability()}")
    half = rows[("float16", "off")]
    assert half["out_dtype"] == "float16" and 0 < half["max_ulp_error"] < 4
    # the float32 row agrees with the test's own computation over the same grid
    from service.engine.numerics import grid
    x = wire_values(grid(), "float32")
    out, _ = reference("sigmoid", x, "float32")
    want = expected("sigmoid", "float32", out, "float32", x)
    assert rows[("float32", "off")]["max_ulp_error"] == pytest.approx(want["max_ulp_error"],
                                                                      rel=1e-6)
    assert app_client.get("/v1/activations/sigmoid/accuracy").json() == table  # cached
    assert app_client.get("/v1/activations/nope/accuracy").status_code == 404
