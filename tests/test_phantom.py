"""Phantom data: determinism, label conventions, physical units, geometry and the folder it becomes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from sar3d.config import validate_config
from sar3d.data.download import run_download
from sar3d.data.phantom import SPECS, case_id, dataset_description, generate_case
from sar3d.io import load_volume, voxel_spacing

SEED = 20210806
SMALL, LARGE = 4000.0, 16000.0  # the phantom's inner volume knots (BRAIN_TUMOUR_VOLUME_KNOTS_MM3)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store shared with the other data-stage tests: creating a store costs seconds."""
    return tmp_path_factory.getbasetemp() / "sar3d-data-results"


@pytest.fixture(scope="module")
def brain_cases() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [generate_case("brain_mri", SEED, index) for index in range(12)]


def voxel_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_same_seed_same_case_and_other_index_differs(kind: str) -> None:
    start = time.perf_counter()
    image, label, affine = generate_case(kind, SEED, 1)
    elapsed = time.perf_counter() - start
    again = generate_case(kind, SEED, 1)
    other = generate_case(kind, SEED, 2)
    other_seed = generate_case(kind, SEED + 1, 1)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    assert np.array_equal(affine, again[2])
    assert not np.array_equal(image, other[0]) and not np.array_equal(label, other[1])
    assert not np.array_equal(image, other_seed[0])
    assert elapsed < 2.0, f"{kind} took {elapsed:.2f} s (target < 0.5 s): vectorisation lost?"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_dtypes_geometry_and_size(kind: str) -> None:
    spec = SPECS[kind]
    image, label, affine = generate_case(kind, SEED, 0)
    assert image.dtype == (np.int16 if spec.modality == "CT" else np.float32)
    assert label.dtype == np.uint8
    assert image.shape[:3] == label.shape
    assert image.shape[3:] == ((len(spec.channels),) if len(spec.channels) > 1 else ())
    np.testing.assert_allclose(voxel_spacing(affine), spec.spacing)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # world origin at the volume centre, so phantoms of different spacing overlay
    centre = affine @ np.array([*(np.array(label.shape) - 1) / 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    # CPU budget: at most ~1.2 M voxels once resampled to 1 mm
    assert np.prod(np.array(label.shape) * voxel_spacing(affine)) <= 1.2e6


@pytest.mark.parametrize("kind", ["chest_ct", "heart_mri", "pancreas_ct", "liver_ct"])
def test_anisotropic_spacing(kind: str) -> None:
    spacing = voxel_spacing(generate_case(kind, SEED, 0)[2])
    assert spacing[2] >= 2 * spacing[0] and spacing[0] == spacing[1]


@pytest.mark.parametrize("kind", ["chest_ct", "liver_ct", "pancreas_ct"])
def test_ct_in_hounsfield_units(kind: str) -> None:
    image, label, _ = generate_case(kind, SEED, 3)
    corners = np.concatenate([image[:6, :6].ravel(), image[-6:, -6:].ravel()])
    assert abs(float(np.median(corners)) + 1000.0) < 25.0  # air
    assert image.max() > 500  # bone
    values = image.astype(np.float64)
    soft = (values > -150) & (values < 200)
    histogram, edges = np.histogram(values[soft], bins=35, range=(-150, 200))
    peak = edges[np.argmax(histogram)]
    assert -120.0 <= peak <= 100.0  # fat or soft tissue dominates the body
    if kind == "chest_ct":
        assert ((values > -920) & (values < -780)).mean() > 0.05  # lung parenchyma
        assert label.max() == 1
    else:
        organ_hu = float(values[label == 1].mean())
        assert 0.0 < organ_hu < 100.0


def test_brain_labels_channels_and_intensities(brain_cases: list) -> None:
    assert SPECS["brain_mri"].channels[0] == "FLAIR"
    assert dataset_description("brain_mri", "brats", [])["modality"]["0"] == "FLAIR"
    for image, label, _ in brain_cases[:4]:
        assert image.ndim == 4 and image.shape[3] == 4
        assert set(np.unique(label)) == {0, 1, 2, 3}
        brain = image[..., 0] > 0
        assert not brain[0].any() and not brain[:, :, -1].any()  # skull-stripped: zero background
        tumour = label > 0
        flair, t1gd = image[..., 0], image[..., 2]
        assert flair[tumour].mean() > 1.5 * flair[brain & ~tumour].mean()  # FLAIR hyperintensity
        assert t1gd[label == 3].mean() > 1.5 * t1gd[label == 1].mean()  # enhancing rim enhances
        assert 200.0 < np.percentile(image[brain], 99) < 4000.0  # scanner-like range


def test_brain_tumour_volumes_span_sizes_and_fill_buckets(brain_cases: list) -> None:
    volumes = np.array([(label > 0).sum() * voxel_mm3(affine) for _, label, affine in brain_cases])
    assert math.log10(volumes.max() / volumes.min()) >= 1.5
    buckets = np.digitize(volumes, [SMALL, LARGE])
    counts = np.bincount(buckets, minlength=3)
    assert counts.min() >= 3, f"bucket counts {counts} for volumes {np.round(volumes)}"


def test_brain_tumour_is_irregular(brain_cases: list) -> None:
    """Not a ball: the tumour fills clearly less than its bounding sphere."""
    _, label, affine = brain_cases[5]
    points = np.argwhere(label > 0) * voxel_spacing(affine)
    radius = np.linalg.norm(points - points.mean(axis=0), axis=1).max()
    fill = len(points) * voxel_mm3(affine) / (4 / 3 * math.pi * radius**3)
    assert fill < 0.8


def test_pancreas_has_organ_and_tumour() -> None:
    for index in range(4):
        image, label, _ = generate_case("pancreas_ct", SEED, index)
        assert set(np.unique(label)) == {0, 1, 2}
        pancreas, tumour = image[label == 1].astype(float), image[label == 2].astype(float)
        assert 40.0 <= pancreas.mean() <= 110.0
        assert tumour.mean() < pancreas.mean() - 20.0  # hypodense


def test_run_download_writes_msd_folder(tmp_path: Path, results: Path) -> None:
    config: dict[str, Any] = validate_config({
        "seed": SEED,
        "results_dir": str(results),
        "tracking": {"experiment": "sar3d-tests-data"},
        "datasets": {"panc": {"source": "phantom", "phantom": "pancreas_ct", "modality": "CT", "n_cases": 2}},
        "tasks": {"pancreas": {"dataset": "panc", "normalisation": "ct_pancreas", "labels": [0, 1, 2],
                               "classes": {"tumour": [2]}, "split": {"kind": "kfold", "n": 2}}},
    })
    out = tmp_path / "raw" / "panc"
    run_download(config, "panc", out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "manifest.json"]
    assert [p.name for p in out.parent.iterdir()] == ["panc"]  # no temporary leftovers
    description = json.loads((out / "dataset.json").read_text())
    assert description["numTraining"] == 2 and description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}
    assert description["sar3d"]["source"] == "phantom" and description["sar3d"]["modality"] == "CT"
    assert description["sar3d"]["spacing_mm"]["median"] == [0.8, 0.8, 2.5]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["case"] for c in manifest["cases"]] == [case_id("pancreas_ct", 0), case_id("pancreas_ct", 1)]
    for entry in description["training"]:
        image, image_affine = load_volume(out / entry["image"])
        label, label_affine = load_volume(out / entry["label"])
        assert image.shape == label.shape and np.array_equal(image_affine, label_affine)
        assert nib.load(out / entry["image"]).get_data_dtype() == np.int16
        assert nib.load(out / entry["label"]).get_data_dtype() == np.uint8

    again = tmp_path / "again"
    run_download(config, "panc", again)
    for entry in description["training"]:
        for key in ("image", "label"):
            assert (out / entry[key]).read_bytes() == (again / entry[key]).read_bytes()
