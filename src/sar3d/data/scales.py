"""Cube scales: a scale's label is its position in ``cubes.scales`` (a light module: config checks import it)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def scale_index(scales: Sequence[float], fraction: float) -> int:
    """Scale label of crops cut at ``fraction`` of the volume side: its position in ``cubes.scales``.

    The one mapping from a scale to its label, so nothing downstream hard-codes
    "0 = 1/2" and a reordered ``cubes.scales`` cannot mislabel an ablation.

    Args:
        scales: ``cubes.scales`` as configured (distinct fractions).
        fraction: the scale asked for, e.g. 0.125 for the 1/8 crops.
    """
    matches = [i for i, s in enumerate(scales) if math.isclose(float(s), float(fraction), rel_tol=1e-9)]
    if len(matches) != 1:
        raise ValueError(f"scale {fraction} is {'listed twice' if matches else 'not'} in cubes.scales {list(scales)}")
    return matches[0]
