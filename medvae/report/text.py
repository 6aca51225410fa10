"""How the reports write numbers."""

from __future__ import annotations

import math


def fmt(v, metric: str = "") -> str:
    """A number for a table: about four significant digits, scientific outside [1e-3, 1e5), "–" when missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if metric.startswith("mmd_p"):
        return f"{v:.3f}"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.1f}"
    return f"{v:.4f}" if a < 1 else f"{v:.3f}"
