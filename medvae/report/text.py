"""How the reports write numbers."""

from __future__ import annotations

import math


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def num(v, spec: str) -> str:
    """``v`` written with the format ``spec`` (``".4g"``, ``"+.2f"``; a str key such as a level "0.05" is read
    as a number first), "–" when missing or not finite."""
    v = float(v) if isinstance(v, str) else v
    return "–" if _missing(v) else format(v, spec)


def fmt(v, metric: str = "") -> str:
    """A number for a table: about four significant digits, scientific outside [1e-3, 1e5), "–" when missing."""
    if _missing(v):
        return "–"
    if metric.startswith("mmd_p"):
        return f"{v:.3f}"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.1f}"
    return f"{v:.4f}" if a < 1 else f"{v:.3f}"
