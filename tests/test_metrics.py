"""Dice and HD95 conventions, HD95 against a brute-force surface distance, size buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from sar3d.data.splits import size_bucket
from sar3d.evaluation.metrics import dice_score, hd95_mm, hd95_undefined

SHAPE = (20, 18, 12)
SPACING = (0.8, 1.1, 2.5)  # anisotropic, as CT/MRI before resampling


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Surface voxels (a 6-neighbour outside, image border counts as outside), all pairwise mm distances."""
    def surface(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    d = cdist(surface(pred), surface(ref))
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def _ellipsoid(centre: tuple[float, ...], radii_mm: tuple[float, ...]) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING, radii_mm, strict=True)) <= 1.0


def test_empty_mask_conventions():
    empty = np.zeros(SHAPE, bool)
    blob = _ellipsoid((10, 9, 6), (4, 4, 6))
    assert math.isnan(dice_score(empty, empty)) and math.isnan(hd95_mm(empty, empty, SPACING))
    assert not hd95_undefined(empty, empty)  # nothing to find: not a failure
    for pred, ref in [(blob, empty), (empty, blob)]:
        assert dice_score(pred, ref) == 0.0
        assert math.isnan(hd95_mm(pred, ref, SPACING))
        assert hd95_undefined(pred, ref)
    assert not hd95_undefined(blob, blob)
    assert hd95_mm(blob, blob, SPACING) == 0.0


def test_hd95_single_voxels_uses_spacing():
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[3, 4, 2] = True
    b[3, 4, 6] = True  # 4 voxels along z at 2.5 mm
    assert hd95_mm(a, b, SPACING) == pytest.approx(10.0)
    b[:] = False
    b[6, 8, 2] = True  # 3 x 0.8 and 4 x 1.1 mm in-plane
    assert hd95_mm(a, b, SPACING) == pytest.approx(math.hypot(2.4, 4.4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_anisotropic_masks(seed):
    rng = np.random.default_rng(seed)
    ref = _ellipsoid(tuple(rng.uniform(6, 10, 3)), tuple(rng.uniform(3, 7, 3)))
    pred = _ellipsoid(tuple(rng.uniform(6, 10, 3)), tuple(rng.uniform(3, 7, 3)))
    pred |= rng.random(SHAPE) < 0.01  # scattered false positives make the tail of the distribution matter
    expected = brute_force_hd95(pred, ref, SPACING)
    assert expected > 0
    assert hd95_mm(pred, ref, SPACING) == pytest.approx(expected, rel=1e-5)
    assert hd95_mm(ref, pred, SPACING) == pytest.approx(expected, rel=1e-5)  # symmetric
    # spacing matters: the same voxels on an isotropic grid give another distance
    assert hd95_mm(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(brute_force_hd95(pred, ref, (1.0, 1.0, 1.0)), rel=1e-5)


def test_size_bucket_boundaries():
    thresholds = (4000.0, 16000.0)
    assert size_bucket(3999.9, thresholds) == "small"
    assert size_bucket(4000.0, thresholds) == "medium"  # small < t0 <= medium
    assert size_bucket(15999.0, thresholds) == "medium"
    assert size_bucket(16000.0, thresholds) == "large"  # medium < t1 <= large
    assert size_bucket(0.0, thresholds) == "small"
