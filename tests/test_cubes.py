"""Multi-scale cubes: scale ratio, crop geometry in mm, labels, resizing, test-case exclusion, split, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from sar3d.config import ConfigError, validate_config
from sar3d.data.cubes import META_COLUMNS, apportion, crop_size, resize_crops, run_cubes
from sar3d.data.loader import open_cube_store
from sar3d.data.scales import scale_index
from sar3d.io import InputDataError

HELDOUT_VALUE = 0.777  # held-out volumes are this constant; kept volumes never reach it
SHAPES = {"c0": (40, 36, 20), "c1": (32, 44, 24), "c2": (36, 36, 16), "c3": (40, 40, 20), "c4": (30, 30, 30)}
SPACING = (0.8, 1.2, 1.0)  # mm; anisotropic so that voxels and millimetres differ
SIZE = (12, 12, 6)  # the 2:2:1 aspect of 64x64x32


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module: creating a store costs seconds."""
    return tmp_path_factory.getbasetemp() / "sar3d-data-results"


def study(results: Path, **cubes: Any) -> dict[str, Any]:
    return validate_config({
        "seed": 11, "results_dir": str(results), "tracking": {"experiment": "sar3d-tests-data"},
        "datasets": {"brats": {"source": "phantom", "phantom": "brain_mri", "modality": "MRI"}},
        "tasks": {"brain": {"dataset": "brats", "normalisation": "zscore_nonzero", "labels": [0, 1],
                            "classes": {"t": [1]}, "split": {"kind": "trials", "n": 1}}},
        "cubes": {"size": list(SIZE), "per_volume": 8, "min_foreground": 0.3, "val_fraction": 0.3, **cubes},
    })


def pretrain_folder(root: Path) -> Path:
    """A preprocessed pre-training folder: foreground in the lower half of x, values <= 0.6."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    cases = []
    for case, shape in SHAPES.items():
        for channel in (0, 1):
            if case in ("c3", "c4"):
                volume = np.full(shape, HELDOUT_VALUE, dtype=np.float32)
            else:
                volume = np.zeros(shape, dtype=np.float32)
                volume[: shape[0] // 2] = 0.2 + 0.4 * rng.random((shape[0] // 2, *shape[1:]))
            rel = f"images/{case}_c{channel}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), root / rel)
            cases.append({"case": case, "channel": channel, "image": rel, "label": None,
                          "shape": list(shape), "foreground_mm3": {}})
    manifest = {"purpose": "pretrain", "dataset": "brats", "task": None, "modality": "MRI",
                "spacing": list(SPACING), "cases": cases}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def heldout_files(root: Path) -> list[Path]:
    root.mkdir(parents=True)
    ours, other = root / "brain.json", root / "other.json"
    ours.write_text(json.dumps({"task": "brain", "dataset": "brats", "cases": ["c3", "c4"]}))
    other.write_text(json.dumps({"task": "liver", "dataset": "lits", "cases": ["c0"]}))
    return [ours, other]


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory, results: Path) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("cubes")
    data = pretrain_folder(root / "pre")
    heldout = heldout_files(root / "splits")
    run_cubes(study(results), "brats", data, heldout, root / "out")
    return root / "out", data, heldout


def test_apportion_is_exact() -> None:
    assert apportion(16, [1, 1, 2]) == [4, 4, 8]
    assert apportion(64, [1, 1, 2]) == [16, 16, 32]
    assert apportion(5, [1, 1, 2]) == [1, 1, 3]
    assert sum(apportion(7, [1, 2, 3, 0])) == 7 and apportion(7, [1, 2, 3, 0])[3] == 0


def expected_box_mm(shape: tuple[int, int, int], fraction: float) -> np.ndarray:
    """The crop box the geometry promises: side = fraction x smaller in-plane extent, aspect 2:2:1."""
    extent = np.array(shape) * SPACING
    return fraction * min(extent[:2]) * np.array([1.0, 1.0, 0.5])


def test_cube_files_scales_and_sizes(cut: tuple[Path, Path, list[Path]]) -> None:
    out, _, _ = cut
    cubes = np.load(out / "cubes.npy", mmap_mode="r")
    meta = pd.read_csv(out / "meta.csv")
    manifest = json.loads((out / "manifest.json").read_text())
    n_volumes = 6  # c0..c2, two channels each
    assert cubes.dtype == np.float32 and cubes.shape == (n_volumes * 8, *SIZE)
    assert list(meta.columns) == META_COLUMNS and list(meta["index"]) == list(range(len(cubes)))
    assert manifest == {"dataset": "brats", "modality": "MRI", "n_cubes": 48, "per_volume": 8, "size": list(SIZE),
                        "scales": [0.5, 0.25, 0.125], "ratio": [1, 1, 2], "excluded_cases": ["c3", "c4"]}
    assert float(cubes.min()) >= 0.0 and float(cubes.max()) <= 1.0
    for _, group in meta.groupby(["case", "channel"]):
        assert list(group["scale"].value_counts().sort_index()) == [2, 2, 4]  # 1:1:2
    assert set(meta["modality"]) == {1}
    for row in meta.itertuples():
        shape = SHAPES[row.case]
        size = np.array([row.size_x, row.size_y, row.size_z])
        origin = np.array([row.origin_x, row.origin_y, row.origin_z])
        assert row.scale_fraction == [0.5, 0.25, 0.125][row.scale]
        assert (origin >= 0).all() and (origin + size <= shape).all()


def test_crop_extents_in_mm_and_aspect_of_every_crop(cut: tuple[Path, Path, list[Path]]) -> None:
    """Each crop is the promised physical box to within half a voxel per axis, so its aspect is 2:2:1."""
    meta = pd.read_csv(cut[0] / "meta.csv")
    spacing = np.array(SPACING)
    for row in meta.itertuples():
        extent_mm = np.array([row.size_x, row.size_y, row.size_z]) * spacing
        box = expected_box_mm(SHAPES[row.case], row.scale_fraction)
        assert np.all(np.abs(extent_mm - box) <= spacing / 2 + 1e-9), (row.case, row.scale, extent_mm, box)
        aspect_lo = (box[0] - spacing[0] / 2) / (box[2] + spacing[2] / 2)
        aspect_hi = (box[0] + spacing[0] / 2) / (box[2] - spacing[2] / 2)
        assert aspect_lo <= extent_mm[0] / extent_mm[2] <= aspect_hi
        assert extent_mm[0] / extent_mm[2] == pytest.approx(2.0, rel=0.5)
    # one physical size per (case, scale) whatever the channel, halving from scale to scale
    widths = meta.assign(mm=meta["size_x"] * SPACING[0]).groupby(["case", "scale"])["mm"].agg(set)
    assert all(len(w) == 1 for w in widths)
    for case in ("c0", "c1", "c2"):
        mm = [widths[(case, s)].pop() for s in range(3)]
        assert mm[0] > mm[1] > mm[2]


def test_thin_volume_crops_shrink_keeping_their_aspect() -> None:
    """A box taller than the volume shrinks on every axis by one factor (documented clamp), never squashed."""
    thin, spacing, out = (100, 80, 10), (1.0, 1.0, 1.0), (64, 64, 32)
    size, clamped = crop_size(thin, spacing, 0.5, out)  # wants 40 x 40 x 20 mm, the volume is 10 mm thick
    assert clamped and size == (20, 20, 10)
    size, clamped = crop_size(thin, spacing, 0.125, out)  # 10 x 10 x 5 mm fits
    assert not clamped and size == (10, 10, 5)
    size, clamped = crop_size((50, 50, 40), (2.0, 2.0, 0.5), 0.5, out)  # wants 50 x 50 x 25 mm, has 20 mm in z
    assert clamped and size == (20, 20, 40)  # 40 x 40 x 20 mm


def test_scale_labels_follow_the_order_of_cubes_scales(tmp_path: Path, cut: tuple[Path, Path, list[Path]],
                                                       results: Path) -> None:
    """Shuffling cubes.scales (and its ratio with it) relabels the same crops; no label is hard-coded."""
    _, data, heldout = cut
    shuffled, ratio = [0.125, 0.5, 0.25], [2, 1, 1]
    run_cubes(study(results, scales=shuffled, ratio=ratio), "brats", data, heldout, tmp_path / "shuffled")
    meta = pd.read_csv(tmp_path / "shuffled" / "meta.csv")
    assert json.loads((tmp_path / "shuffled" / "manifest.json").read_text())["scales"] == shuffled
    for fraction, weight in zip(shuffled, ratio, strict=True):
        label = scale_index(shuffled, fraction)
        assert shuffled[label] == fraction
        rows = meta[meta["scale"] == label]
        assert set(rows["scale_fraction"]) == {fraction}
        assert len(rows) == 6 * 8 * weight // 4  # six volumes, 8 cubes each in 2:1:1
        for row in rows.itertuples():
            extent_mm = np.array([row.size_x, row.size_y, row.size_z]) * np.array(SPACING)
            assert np.all(np.abs(extent_mm - expected_box_mm(SHAPES[row.case], fraction)) <= np.array(SPACING) / 2)
    assert [scale_index([0.5, 0.25, 0.125], f) for f in shuffled] == [2, 0, 1]
    with pytest.raises(ValueError, match="not"):
        scale_index(shuffled, 1 / 3)


def test_per_dataset_cubes_per_volume(tmp_path: Path, cut: tuple[Path, Path, list[Path]], results: Path) -> None:
    _, data, heldout = cut
    config = study(results, per_volume_by_dataset={"brats": 4})
    run_cubes(config, "brats", data, heldout, tmp_path / "four")
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    meta = pd.read_csv(tmp_path / "four" / "meta.csv")
    assert manifest["per_volume"] == 4 and manifest["n_cubes"] == 6 * 4
    assert list(meta.groupby(["case", "channel"]).size().unique()) == [4]
    with pytest.raises(ConfigError, match=r"per_volume_by_dataset\.lits"):
        study(results, per_volume_by_dataset={"lits": 128})


def test_resizing_is_anti_aliased_and_keeps_flat_regions_flat() -> None:
    rng = np.random.default_rng(3)
    flat = np.full((2, 30, 30, 15), 0.6, dtype=np.float32)
    for crops in (flat, flat[:, :5, :5, :3]):  # downsampled and upsampled
        np.testing.assert_allclose(resize_crops(crops, SIZE), 0.6, atol=1e-5)  # no darkened borders
    checker = (np.indices((31, 29, 17)).sum(axis=0) % 2).astype(np.float32)[None]
    # a voxel-scale checkerboard shrunk ~2.5x averages to grey instead of aliasing into a coarse pattern
    # (plain trilinear sampling leaves deviations of 0.35 here)
    small = resize_crops(checker, SIZE)
    assert small.shape == (1, *SIZE) and np.all(np.abs(small - 0.5) <= 0.05)
    noise = rng.random((1, 60, 60, 30), dtype=np.float32)
    assert resize_crops(noise, SIZE).std() < 0.3 * noise.std()  # averaging 5x5x5 voxels, not picking one


def test_crops_reach_min_foreground(cut: tuple[Path, Path, list[Path]]) -> None:
    out, _, _ = cut
    meta = pd.read_csv(out / "meta.csv")
    fractions = []
    for row in meta.itertuples():
        half = SHAPES[row.case][0] // 2  # foreground is x < half
        inside = max(0, min(row.origin_x + row.size_x, half) - row.origin_x)
        fractions.append(inside / row.size_x)
    assert min(fractions) >= 0.3


def test_heldout_cases_never_reach_cubes(cut: tuple[Path, Path, list[Path]]) -> None:
    out, _, _ = cut
    meta = pd.read_csv(out / "meta.csv")
    assert set(meta["case"]) == {"c0", "c1", "c2"}  # c0 is held out for another dataset only
    cubes = np.load(out / "cubes.npy")
    assert not np.isclose(cubes, HELDOUT_VALUE, atol=1e-3).any()
    assert cubes.max() <= 0.6 + 1e-6


def test_split_by_case_and_deterministic(tmp_path: Path, cut: tuple[Path, Path, list[Path]], results: Path) -> None:
    out, data, heldout = cut
    meta = pd.read_csv(out / "meta.csv")
    per_case = meta.groupby("case")["split"].agg(set)
    assert all(len(s) == 1 for s in per_case)  # a case is all train or all val
    assert sorted(s.pop() for s in per_case) == ["train", "train", "val"]

    run_cubes(study(results), "brats", data, heldout, tmp_path / "again")
    assert (tmp_path / "again" / "cubes.npy").read_bytes() == (out / "cubes.npy").read_bytes()
    assert (tmp_path / "again" / "meta.csv").read_text() == (out / "meta.csv").read_text()

    run_cubes({**study(results), "seed": 12}, "brats", data, heldout, tmp_path / "other")
    assert not np.array_equal(np.load(tmp_path / "other" / "cubes.npy"), np.load(out / "cubes.npy"))


def test_store_reads_what_was_cut(cut: tuple[Path, Path, list[Path]]) -> None:
    out, _, _ = cut
    meta = pd.read_csv(out / "meta.csv")
    store = open_cube_store([out], "val")
    assert len(store) == (meta["split"] == "val").sum()
    batch = store.fetch([0, len(store) - 1])
    rows = meta.index[meta["split"] == "val"][[0, -1]]
    np.testing.assert_array_equal(batch["cube"][:, 0].numpy(), np.load(out / "cubes.npy")[rows])
    assert batch["scale"].tolist() == meta.loc[rows, "scale"].tolist()


def test_exclusion_leaving_too_few_cases_is_refused(tmp_path: Path, cut: tuple[Path, Path, list[Path]],
                                                   results: Path) -> None:
    _, data, _ = cut
    (tmp_path / "h.json").write_text(json.dumps({"task": "b", "dataset": "brats", "cases": ["c0", "c1", "c2", "c3"]}))
    with pytest.raises(InputDataError, match="only 1 case"):
        run_cubes(study(results), "brats", data, [tmp_path / "h.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
