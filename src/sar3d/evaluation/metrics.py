"""Segmentation metrics per (case, class): Dice and the 95th-percentile Hausdorff distance.

Both are computed on binary masks of one class on the evaluation grid, with
these conventions for empty masks (P = prediction, R = reference):

========================  ==============================  ==================================
case                      Dice                            HD95 (mm)
========================  ==============================  ==================================
P and R non-empty         ``2|P∩R| / (|P| + |R|)``        symmetric HD95, see below
exactly one empty         0 (a missed or invented         NaN, flagged ``hd95_undefined``
                          lesion)                         (no surface to measure from)
both empty                NaN (the case says nothing      NaN (not flagged: nothing to find)
                          about the class)
========================  ==============================  ==================================

NaN values are excluded from every mean and counted (``n_empty`` / ``n_hd95_undefined``
in the evaluation summary). The one-empty HD95 convention is MONAI's (it returns
NaN/inf there); BraTS instead substitutes the image diagonal (373.13 mm), which
mixes a detection failure into a distance - we count detection failures
separately (they already score Dice 0).

HD95 is MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)``:
surface voxels are mask voxels with a 6-neighbour outside the mask (MONAI's
``get_mask_edges``), distances are Euclidean in millimetres using the voxel
spacing, and the value is ``max(q95(d(P→R)), q95(d(R→P)))`` with linear
interpolation between order statistics. (medpy's ``hd95`` takes the 95th
percentile of the pooled distances instead; it differs slightly.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

HD95_PERCENTILE = 95.0


def _as_bool(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(mask).bool()


def dice_score(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks with the conventions of the module docstring (NaN / 0 / overlap)."""
    p, r = _as_bool(pred), _as_bool(ref)
    n_p, n_r = int(p.sum()), int(r.sum())
    if n_p == 0 and n_r == 0:
        return math.nan
    if n_p == 0 or n_r == 0:
        return 0.0
    return 2.0 * int((p & r).sum()) / (n_p + n_r)


def dice_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> list[float]:
    """:func:`dice_score` of every channel of ``(C, ...)`` masks."""
    return [dice_score(pred[c], ref[c]) for c in range(len(ref))]


def hd95_undefined(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> bool:
    """True when exactly one mask is empty: HD95 has no surface to measure from."""
    return bool(_as_bool(pred).any()) != bool(_as_bool(ref).any())


def hd95_mm(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, spacing: Sequence[float]
) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two binary masks; NaN if either is empty."""
    from monai.metrics import compute_hausdorff_distance

    p, r = _as_bool(pred), _as_bool(ref)
    if not p.any() or not r.any():
        return math.nan
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            p[None, None].float(), r[None, None].float(), include_background=True,
            percentile=HD95_PERCENTILE, directed=False, spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])
