"""Normalisation stage: intensity formulas, resampling geometry, manifests and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pytest

from sar3d.config import tracking_uri, validate_config
from sar3d.data.normalise import (
    ct_pancreas,
    minmax_to_unit,
    resample_to_spacing,
    run_normalise_pretrain,
    run_normalise_task,
    zscore_nonzero,
)
from sar3d.data.phantom import write_phantom_dataset
from sar3d.io import InputDataError, voxel_spacing

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
FIXED = {"pretrain_scaling": "fixed"}


def study(results: Path, **sections: Any) -> dict[str, Any]:
    """A minimal valid study over small synthetic datasets, plus section overrides."""
    config: dict[str, Any] = {
        "results_dir": str(results),
        "tracking": {"experiment": "sar3d-tests-data"},
        "datasets": {
            "ct": {"source": "phantom", "phantom": "chest_ct", "modality": "CT"},
            "mri": {"source": "phantom", "phantom": "brain_mri", "modality": "MRI"},
            "panc": {"source": "phantom", "phantom": "pancreas_ct", "modality": "CT"},
        },
        "pretrain": {"datasets": {"ct": {"channels": [0]}, "mri": {"channels": [0, 2]}}},
        "tasks": {
            "brain": {
                "dataset": "mri", "channel": 1, "normalisation": "zscore_nonzero", "labels": [0, 1, 2, 3],
                "classes": {"whole_tumour": [1, 2, 3], "core": [2, 3]},
                "split": {"kind": "trials", "n": 2},
            },
            "pancreas": {
                "dataset": "panc", "normalisation": "ct_pancreas", "labels": [0, 1, 2],
                "classes": {"organ": [1, 2], "tumour": [2]}, "split": {"kind": "kfold", "n": 2},
            },
        },
        **sections,
    }
    return validate_config(config)


Case = tuple[np.ndarray, "np.ndarray | None", np.ndarray]  # image, label, affine


def write_msd(root: Path, cases: dict[str, Case]) -> Path:
    """A raw MSD-layout folder: imagesTr/, labelsTr/ and dataset.json listing the cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for name, (image, label, affine) in cases.items():
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
        entry = {"image": f"./imagesTr/{name}.nii.gz"}
        if label is not None:
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
            entry["label"] = f"./labelsTr/{name}.nii.gz"
        training.append(entry)
    spec = {"name": root.name, "modality": {"0": "X"}, "labels": {"0": "background"},
            "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module: creating a store costs seconds."""
    return tmp_path_factory.getbasetemp() / "sar3d-data-results"


def affine_of(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def loaded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_pretrain_ct_intensities_geometry_and_manifest(tmp_path: Path, results: Path) -> None:
    on_grid = np.array([-3000, -1000, 0, 500, 1000, 3000], dtype=np.float32).reshape(6, 1, 1) * np.ones((6, 4, 3))
    flat = np.zeros((20, 18, 8), dtype=np.float32)  # 0 HU everywhere, on a coarse flipped grid
    coarse = affine_of((-0.8, 0.9, 2.5), (10.0, 5.0, 20.0))
    raw = write_msd(
        tmp_path / "raw", {"grid": (on_grid.astype(np.int16), None, np.eye(4)), "flat": (flat, None, coarse)}
    )

    out = tmp_path / "pre"
    run_normalise_pretrain(study(results, preprocess=FIXED), "ct", raw, out)

    grid, _ = loaded(out / "images" / "grid_c0.nii.gz")
    np.testing.assert_allclose(grid[:, 0, 0], [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)

    data, affine = loaded(out / "images" / "flat_c0.nii.gz")
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, 0.5, atol=1e-6)  # 0 HU -> exactly the middle of [0, 1]
    np.testing.assert_allclose(voxel_spacing(affine), [1.0, 1.0, 1.0])
    assert np.sign(affine[0, 0]) == -1  # orientation kept
    np.testing.assert_allclose(affine[:3, 3], coarse[:3, 3], atol=1.0)  # origin within a voxel
    old_extent = (np.array(flat.shape) - 1) * [0.8, 0.9, 2.5]
    new_extent = np.array(data.shape) - 1
    assert np.all(np.abs(new_extent - old_extent) <= 1.0)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["purpose"] == "pretrain" and manifest["modality"] == "CT"
    assert manifest["spacing"] == [1.0, 1.0, 1.0]
    assert [(c["case"], c["channel"], c["label"]) for c in manifest["cases"]] == [("grid", 0, None), ("flat", 0, None)]
    assert manifest["cases"][1]["shape"] == list(data.shape)
    assert not list(tmp_path.glob(".*partial"))


def test_pretrain_mri_channels_last_and_clip(tmp_path: Path, results: Path) -> None:
    image = np.stack([np.full((6, 6, 5), v, dtype=np.float32) for v in (4000, 2000, 8000, 100)], axis=-1)
    raw = write_msd(tmp_path / "raw", {"c1": (image, None, np.eye(4))})
    out = tmp_path / "pre"
    run_normalise_pretrain(study(results, preprocess=FIXED), "mri", raw, out)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["c1_c0.nii.gz", "c1_c2.nii.gz"]
    np.testing.assert_allclose(loaded(out / "images" / "c1_c0.nii.gz")[0], 1.0)  # 4000 -> 1
    np.testing.assert_allclose(loaded(out / "images" / "c1_c2.nii.gz")[0], 1.0)  # clipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["case"] for c in manifest["cases"]} == {"c1"}

    client = mlflow.MlflowClient(tracking_uri(study(results)))
    experiment = client.get_experiment_by_name("sar3d-tests-data")
    runs = client.search_runs([experiment.experiment_id], "tags.job_key = 'normalise/dataset=mri'")
    assert any(r.data.metrics.get("n_volumes") == 2 and r.data.metrics.get("n_cases") == 1 for r in runs)


def test_minmax_maps_each_volumes_own_range() -> None:
    ramp = np.linspace(-2000.0, 3000.0, 1001, dtype=np.float32)  # clipped to [0, 4000]: 601 distinct values
    unit = minmax_to_unit(ramp, 0.0, 4000.0, [0.0, 100.0])
    np.testing.assert_allclose(unit, np.clip(ramp, 0, 3000) / 3000.0, atol=1e-6)  # own max 3000 -> 1, not 0.75
    robust = minmax_to_unit(ramp, 0.0, 4000.0, [0.0, 90.0])
    top = np.percentile(np.clip(ramp, 0, 4000), 90)
    np.testing.assert_allclose(robust, np.clip(np.clip(ramp, 0, 3000) / top, 0, 1), atol=1e-6)
    sparse = np.zeros(1000, dtype=np.float32)
    sparse[0] = 50.0  # the 99.5th percentile is the background: the maximum is used
    assert minmax_to_unit(sparse, 0.0, 4000.0, [0.0, 99.5]).max() == 1.0
    with pytest.raises(ValueError, match="constant"):
        minmax_to_unit(np.full(10, 7000.0, dtype=np.float32), 0.0, 4000.0, [0.0, 99.5])  # constant once clipped


def test_constant_volume_is_an_input_error_naming_the_file(tmp_path: Path, results: Path) -> None:
    varied = np.arange(60, dtype=np.float32).reshape(5, 4, 3) * 10
    flat = np.full((5, 4, 3), 300.0, dtype=np.float32)
    raw = write_msd(tmp_path / "raw", {"a": (varied, None, np.eye(4)), "b": (flat, None, np.eye(4))})
    config = study(results)
    with pytest.raises(InputDataError, match="constant") as err:
        run_normalise_pretrain(config, "ct", raw, tmp_path / "out")
    assert err.value.path == raw / "imagesTr" / "b.nii.gz"
    assert not (tmp_path / "out").exists()
    run_normalise_pretrain(study(results, preprocess=FIXED), "ct", raw, tmp_path / "out")  # fixed maps it to 0.65
    np.testing.assert_allclose(loaded(tmp_path / "out" / "images" / "b_c0.nii.gz")[0], 0.65, atol=1e-6)


def body_mask(raw: np.ndarray, modality: str) -> np.ndarray:
    """Voxels inside the body, from the raw intensities: CT above -500 HU, MRI above a tenth of the median signal."""
    if modality == "CT":
        return raw > -500.0
    return raw > 0.1 * np.median(raw[raw > 0])


def assert_spans_unit(unit: np.ndarray, raw: np.ndarray, modality: str, where: str) -> None:
    """The issue's criterion: background reaches 0 (1st percentile <= 0.05), the body reaches 1 (99th >= 0.9)."""
    body = body_mask(raw, modality)
    assert body.mean() > 0.1, where
    assert unit.min() >= 0.0 and unit.max() <= 1.0, where
    assert np.percentile(unit, 1) <= 0.05, where
    assert np.percentile(unit[body], 99) >= 0.9, where


def normalised_pairs(out: Path, raw: Path, spacing: list[float]):
    """(case, channel, normalised volume, raw volume resampled to the same grid) for every output volume."""
    for entry in json.loads((out / "manifest.json").read_text())["cases"]:
        unit, _ = loaded(out / entry["image"])
        image = nib.load(str(raw / "imagesTr" / f"{entry['case']}.nii.gz"))
        data = np.asarray(image.dataobj, dtype=np.float32)
        data = data[..., entry["channel"]] if data.ndim == 4 else data
        resampled, _ = resample_to_spacing(data[None], image.affine, spacing)
        yield entry["case"], entry["channel"], unit, resampled[0]


def test_phantom_pretraining_volumes_of_both_modalities_span_unit(tmp_path: Path, results: Path) -> None:
    kinds = {"chest": ("chest_ct", "CT"), "liver": ("liver_ct", "CT"), "brain": ("brain_mri", "MRI"),
             "heart": ("heart_mri", "MRI")}
    spacing = [2.0, 2.0, 2.0]
    datasets = {name: {"source": "phantom", "phantom": kind, "modality": mod} for name, (kind, mod) in kinds.items()}
    channels = {name: {"channels": [0, 1, 2, 3] if name == "brain" else [0]} for name in kinds}
    tasks = {"b": {"dataset": "brain", "normalisation": "zscore_nonzero", "labels": [0, 1, 2, 3],
                   "classes": {"t": [1, 2, 3]}, "split": {"kind": "trials", "n": 1}}}
    base = {"results_dir": str(results), "tracking": {"experiment": "sar3d-tests-data"}, "datasets": datasets,
            "pretrain": {"datasets": channels}, "tasks": tasks}
    narrow_mri = []
    for name, (kind, modality) in kinds.items():
        raw = tmp_path / "raw" / name
        write_phantom_dataset(kind, 2, 7, raw)
        for scaling in ("minmax", "fixed"):
            config = validate_config({**base, "preprocess": {"spacing": spacing, "pretrain_scaling": scaling}})
            out = tmp_path / scaling / name
            run_normalise_pretrain(config, name, raw, out)
            for case, channel, unit, resampled in normalised_pairs(out, raw, spacing):
                if scaling == "minmax":
                    assert_spans_unit(unit, resampled, modality, f"{name} {case} c{channel}")
                elif modality == "MRI":
                    narrow_mri.append(np.percentile(unit[body_mask(resampled, modality)], 99))
    # what the option keeps: the fixed [0, 4000] mapping leaves phantom MRI far below 1
    assert max(narrow_mri) < 0.7


def brain_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 'head' of positive intensities in a zero background, with a nested label blob."""
    shape = (24, 22, 12)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / (np.array(shape)[:, None, None, None] / 2.4)) ** 2).sum(0))
    image = np.where(radius < 1.0, 300 + 100 * rng.random(shape), 0).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[radius < 0.6] = 1
    label[radius < 0.4] = 2
    label[radius < 0.2] = 3
    return image, label


def test_task_zscore_labels_and_volumes(tmp_path: Path, results: Path) -> None:
    rng = np.random.default_rng(0)
    image, label = brain_case(rng)
    four = np.stack([np.zeros_like(image), image, np.zeros_like(image), np.zeros_like(image)], axis=-1)
    affine = affine_of((1.2, 1.0, 1.5), (-5.0, 0.0, 3.0))
    raw = write_msd(tmp_path / "raw", {"b1": (four, label, affine)})
    out = tmp_path / "brain"
    run_normalise_task(study(results), "brain", raw, out)

    data, new_affine = loaded(out / "images" / "b1.nii.gz")
    lab, lab_affine = loaded(out / "labels" / "b1.nii.gz")
    np.testing.assert_allclose(voxel_spacing(new_affine), 1.0)
    np.testing.assert_allclose(lab_affine, new_affine)
    assert lab.dtype == np.uint8 and data.shape == lab.shape
    assert set(np.unique(lab)) <= {0, 1, 2, 3} and set(np.unique(lab)) >= {1, 3}
    inside = data[data != 0]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1.0) < 1e-4
    zeros = (data == 0).mean()
    assert abs(zeros - (image == 0).mean()) < 0.05  # background stays exactly 0
    assert data[0, 0, 0] == 0

    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["cases"][0]
    assert manifest["task"] == "brain" and manifest["dataset"] == "mri"
    assert entry["channel"] == 1 and entry["label"] == "labels/b1.nii.gz"
    voxel = 1.2 * 1.0 * 1.5
    assert entry["foreground_mm3"]["whole_tumour"] == pytest.approx((label > 0).sum() * voxel)
    assert entry["foreground_mm3"]["core"] == pytest.approx((label >= 2).sum() * voxel)


def test_zscore_and_pancreas_formulas() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0, 0.0], dtype=np.float32)
    z = zscore_nonzero(x)
    np.testing.assert_allclose(z, [0, -np.sqrt(1.5), 0, np.sqrt(1.5), 0], atol=1e-6)
    hu = np.array([-500.0, -96.0, 77.99, 215.0, 1000.0])
    expected = [(-96 - 77.99) / 75.40, (-96 - 77.99) / 75.40, 0.0, (215 - 77.99) / 75.40, (215 - 77.99) / 75.40]
    np.testing.assert_allclose(ct_pancreas(hu), expected, atol=1e-6)


def test_task_pancreas_on_grid(tmp_path: Path, results: Path) -> None:
    image = np.array([-500, -96, 0, 215, 1000, 100], dtype=np.float32).reshape(6, 1, 1) * np.ones((6, 3, 2))
    label = np.zeros(image.shape, dtype=np.uint8)
    label[3:, :, :] = 1
    label[5, :, :] = 2
    raw = write_msd(tmp_path / "raw", {"p1": (image.astype(np.float32), label, np.eye(4))})
    out = tmp_path / "panc"
    run_normalise_task(study(results), "pancreas", raw, out)
    data, _ = loaded(out / "images" / "p1.nii.gz")
    np.testing.assert_allclose(data[:, 0, 0], ct_pancreas(image[:, 0, 0]), atol=1e-6)
    assert data[2, 0, 0] == pytest.approx((0 - 77.99) / 75.40, abs=1e-6)
    fg = json.loads((out / "manifest.json").read_text())["cases"][0]["foreground_mm3"]
    assert fg == {"organ": 18.0, "tumour": 6.0}


def test_real_mri_resampled_to_2mm(tmp_path: Path, results: Path) -> None:
    if not CH2.exists():
        pytest.skip("mricron's ch2.nii.gz is not installed")
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    shutil.copy(CH2, raw / "imagesTr" / "ch2.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/ch2.nii.gz"}]}))
    out = tmp_path / "pre"
    config = study(results, preprocess={"spacing": [2.0, 2.0, 2.0]}, pretrain={"datasets": {"mri": {}}})
    run_normalise_pretrain(config, "mri", raw, out)
    data, affine = loaded(out / "images" / "ch2_c0.nii.gz")
    assert data.shape == (91, 109, 91)  # 181x217x181 voxel centres at 1 mm span 180x216x180 mm
    np.testing.assert_allclose(voxel_spacing(affine), 2.0)
    np.testing.assert_allclose(affine[:3, 3], nib.load(str(CH2)).affine[:3, 3], atol=1e-6)
    assert data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0
    (_, _, unit, resampled), = normalised_pairs(out, raw, [2.0, 2.0, 2.0])
    assert_spans_unit(unit, resampled, "MRI", "ch2")  # a real T1 (0-254) reaches the whole of [0, 1]


def expect_failure(run, raw: Path, out: Path, bad_file: Path) -> None:
    """The error names the offending file and no output (finished or partial) is left."""
    with pytest.raises(InputDataError) as err:
        run(raw, out)
    assert err.value.path == bad_file and str(bad_file) in str(err.value)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_nan_and_truncated_images_are_refused(tmp_path: Path, results: Path) -> None:
    config = study(results)
    good = np.arange(100, dtype=np.float32).reshape(5, 5, 4)
    bad = good.copy()
    bad[2, 2, 2] = np.nan
    raw = write_msd(tmp_path / "raw", {"a": (good, None, np.eye(4)), "b": (bad, None, np.eye(4))})
    run = lambda r, o: run_normalise_pretrain(config, "ct", r, o)  # noqa: E731
    expect_failure(run, raw, tmp_path / "out", raw / "imagesTr" / "b.nii.gz")

    blob = (raw / "imagesTr" / "a.nii.gz").read_bytes()
    (raw / "imagesTr" / "b.nii.gz").write_bytes(blob[: len(blob) // 2])
    expect_failure(run, raw, tmp_path / "out", raw / "imagesTr" / "b.nii.gz")


def test_bad_labels_and_grids_are_refused(tmp_path: Path, results: Path) -> None:
    config = study(results)
    run = lambda r, o: run_normalise_task(config, "pancreas", r, o)  # noqa: E731
    image = np.ones((6, 5, 4), dtype=np.float32)
    label = np.zeros((6, 5, 4), dtype=np.uint8)
    label[1, 1, 1] = 7
    raw = write_msd(tmp_path / "raw", {"p": (image, label, np.eye(4))})
    expect_failure(run, raw, tmp_path / "out", raw / "labelsTr" / "p.nii.gz")

    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.uint8), np.eye(4)), raw / "labelsTr" / "p.nii.gz")
    expect_failure(run, raw, tmp_path / "out", raw / "labelsTr" / "p.nii.gz")

    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), affine_of((2, 1, 1), (0, 0, 0))),
             raw / "labelsTr" / "p.nii.gz")
    expect_failure(run, raw, tmp_path / "out", raw / "labelsTr" / "p.nii.gz")
