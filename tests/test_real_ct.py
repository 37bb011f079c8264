"""Pre-training normalisation and cube cutting on a real head CT in Hounsfield units.

The CT is InVesalius' "Cranium" example (Debian package invesalius-examples): raw
int16 HU inside a gzipped tar with a plist header. Synthetic phantoms cannot show
that real air, soft tissue and bone land where the paper's normalisation says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from realdata import CRANIUM, needs, read_inv3
from sar3d.config import validate_config
from sar3d.data.cubes import apportion, cut_cubes
from sar3d.data.normalise import resample_to_spacing, run_normalise_pretrain
from sar3d.io import load_volume, voxel_spacing

# CI installs the package, so there a missing file fails instead of skipping
pytestmark = needs(CRANIUM)


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A one-case MSD-style raw folder holding the real CT."""
    hu, spacing = read_inv3(CRANIUM)
    raw = tmp_path_factory.mktemp("raw") / "headct"
    (raw / "imagesTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu, np.diag([*spacing, 1.0])), raw / "imagesTr" / "cranium.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"name": "cranium", "modality": {"0": "CT"},
                                                  "training": [{"image": "./imagesTr/cranium.nii.gz"}]}))
    return raw, hu


def test_the_real_ct_is_in_hounsfield_units(head_ct: tuple[Path, np.ndarray]) -> None:
    _, hu = head_ct
    assert hu.min() <= -1000 and hu.max() >= 1500  # air and dense bone
    assert np.mean(hu < -900) > 0.3  # most of a head CT's field of view is air


def test_pretraining_normalisation_of_a_real_ct(
    head_ct: tuple[Path, np.ndarray], tiny_config: dict[str, Any], tmp_path: Path
) -> None:
    raw, hu = head_ct
    config = dict(tiny_config)
    config["datasets"] = {**config["datasets"], "headct": {"source": "folder", "path": str(raw), "modality": "CT"}}
    config["pretrain"] = {**config["pretrain"], "datasets": {"headct": {"channels": [0]}}}
    config["preprocess"] = {**config["preprocess"], "spacing": [2.0, 2.0, 2.0]}
    config = validate_config(config)
    out = tmp_path / "pre"
    run_normalise_pretrain(config, "headct", raw, out)

    manifest = json.loads((out / "manifest.json").read_text())
    (case,) = manifest["cases"]
    volume, affine = load_volume(out / case["image"])
    np.testing.assert_allclose(voxel_spacing(affine), [2.0, 2.0, 2.0])
    # physical extent kept within a voxel: 256 x 0.957 mm ~ 245 mm -> ~122 voxels of 2 mm
    assert abs(volume.shape[0] * 2.0 - hu.shape[0] * 0.957) <= 2.0
    assert volume.min() >= 0.0 and volume.max() <= 1.0
    # air and dense bone reach both clip bounds, so the per-volume min-max is [-1000, 1000] HU -> [0, 1]:
    # air ~ 0, water 0.5, bone saturates at 1
    assert np.mean(volume < 0.05) > 0.3
    brain = volume[(volume > 0.5) & (volume < 0.6)]  # 0..200 HU: brain and soft tissue
    assert brain.size > 0.05 * volume.size
    assert np.mean(volume >= 0.99) > 0.005  # skull
    # per-volume min-max (the default) spans [0, 1]: air reaches 0, the head (above -500 HU) reaches 1
    raw_affine = nib.load(str(raw / "imagesTr" / "cranium.nii.gz")).affine
    head, _ = resample_to_spacing(hu.astype(np.float32)[None], raw_affine, [2.0, 2.0, 2.0])
    assert head.shape[1:] == volume.shape
    assert np.percentile(volume, 1) <= 0.05 and np.percentile(volume[head[0] > -500], 99) >= 0.9

    # multi-scale cubes from real anatomy: 1:1:2, all the configured size, in [0, 1], boxes of aspect 2:2:1
    counts = apportion(8, [1, 1, 2])
    cubes, crops = cut_cubes(volume, (2.0, 2.0, 2.0), counts, [0.5, 0.25, 0.125], (32, 32, 16), 0.05,
                             np.random.default_rng(0))
    assert cubes.shape == (8, 32, 32, 16)
    assert [c.scale for c in crops].count(2) == 2 * [c.scale for c in crops].count(0) == 4
    assert cubes.min() >= 0.0 and cubes.max() <= 1.0
    in_plane_mm = 2.0 * min(volume.shape[:2])
    for crop, cube in zip(crops, cubes, strict=True):
        assert np.mean(cube > 0.01) >= 0.05  # no empty air cubes
        side = [0.5, 0.25, 0.125][crop.scale] * in_plane_mm
        assert not crop.clamped
        np.testing.assert_allclose(np.array(crop.size) * 2.0, [side, side, side / 2], atol=1.0)
