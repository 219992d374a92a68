"""The numerics report (docs/lab.md, "Numerics"): how far the answer returned is from the
exact value. Computed by ``service/engine/numerics.py`` after the answer."""

from __future__ import annotations

from service.engine.reports.base import BaseReport


class Numerics(BaseReport):
    name = "numerics"
    compute = "service.engine.numerics:measured"
    stage = "after"
    binary = "header"  # X-Report-Numerics

    def bytes_per_element(self, ops: int) -> int:
        # the request again in float64 and in float32, compared (float64 temporaries)
        return 8 * (ops + 6) + 4 * ops


REPORT = Numerics()
