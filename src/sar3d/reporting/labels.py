"""How tables and figures write classes and label ratios (the paper's words and fractions)."""

from __future__ import annotations

import math


def class_title(name: str) -> str:
    """``whole_tumour`` -> ``Tumour``, ``organ`` -> ``Organ`` (the paper's column words)."""
    return name.split("_")[-1].capitalize()


def ratio_label(ratio: float) -> str:
    """0.5 -> ``1/2``, 0.02 -> ``1/50``, 1 -> ``1``, 0.3 -> ``0.3`` (the paper writes proportions as fractions)."""
    if math.isclose(ratio, 1.0):
        return "1"
    inverse = 1.0 / ratio
    return f"1/{round(inverse)}" if math.isclose(inverse, round(inverse), rel_tol=1e-6) else f"{ratio:g}"
