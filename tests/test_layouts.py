"""The `folder` source on the paper's datasets as they ship: BraTS2018, LUNA16 and LiTS into the MSD raw layout.

Each folder is in the exact native layout, built from real anatomy (tests/native_layouts.py);
each layout also gets its bad inputs, which must stop the data stage naming the file and
leave no raw folder behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from native_layouts import LUNA_ORIGINS, LUNA_UIDS, Built, brats2018_folder, lits_folder, luna16_folder, save_nifti
from realdata import CH2, CRANIUM, needs
from sar3d.config import ConfigError, validate_config
from sar3d.data.convert import convert_folder, folder_layout
from sar3d.data.download import run_download
from sar3d.data.layouts import open_layout
from sar3d.data.normalise import run_normalise_pretrain, run_normalise_task
from sar3d.io import InputDataError, load_volume
from tinystudy import REPO

pytestmark = needs(CH2, CRANIUM)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results folder and MLflow store for the module: creating a store costs seconds."""
    return tmp_path_factory.mktemp("layout-results")


def real_study(results: Path, **datasets: dict[str, Any]) -> dict[str, Any]:
    """The default study with some datasets replaced by folders (other datasets and the tasks unchanged)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["results_dir"] = str(results)
    config["tracking"] = {"uri": f"sqlite:///{results}/mlflow.db", "experiment": "sar3d-tests-layouts"}
    config["datasets"].update({name: {"source": "folder", **spec} for name, spec in datasets.items()})
    return validate_config(config)


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return brats2018_folder(tmp_path_factory.mktemp("native") / "MICCAI_BraTS_2018_Data_Training")


@pytest.fixture(scope="module")
def luna(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return luna16_folder(tmp_path_factory.mktemp("native") / "LUNA16")


@pytest.fixture(scope="module")
def lits(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return lits_folder(tmp_path_factory.mktemp("native") / "LiTS")


def task01_labels(brats_seg: np.ndarray) -> np.ndarray:
    """BraTS -> MSD Task01 values, written out independently of the code under test."""
    return np.select([brats_seg == 2, brats_seg == 1, brats_seg == 4], [1, 2, 3], 0)


def copy_of(built: Built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built.root, tmp_path / built.root.name))


# --------------------------------------------------------------------------- BraTS2018


def test_brats2018_becomes_the_msd_task01_layout(brats: Built, results: Path, tmp_path: Path) -> None:
    config = real_study(results, brats={"path": str(brats.root), "modality": "MRI"})
    out = tmp_path / "raw" / "brats"
    run_download(config, "brats", out)

    description = json.loads((out / "dataset.json").read_text())
    assert description["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert description["labels"] == {"0": "background", "1": "peritumoral edema",
                                     "2": "necrotic / non-enhancing tumour core", "3": "enhancing tumour"}
    assert description["sar3d"]["layout"] == "brats2018"
    assert description["sar3d"]["label_map"] == {"2": 1, "1": 2, "4": 3}
    assert [e["image"] for e in description["training"]] == [f"./imagesTr/{c}.nii.gz" for c in brats.images]
    for case, image in brats.images.items():
        converted, affine = load_volume(out / "imagesTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(converted, image)  # X, Y, Z, 4 with FLAIR first
        np.testing.assert_allclose(affine, brats.affines[case], atol=1e-4)
        label, _ = load_volume(out / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(label, task01_labels(brats.labels[case]))

    # the study's brain task takes the converted folder as it is; whole tumour = every BraTS tumour label
    task_out = tmp_path / "tasks" / "brain_tumour"
    run_normalise_task(config, "brain_tumour", out, task_out)
    manifest = json.loads((task_out / "manifest.json").read_text())
    for entry in manifest["cases"]:
        voxel_mm3 = abs(np.linalg.det(brats.affines[entry["case"]][:3, :3]))
        expected = float((brats.labels[entry["case"]] > 0).sum()) * voxel_mm3
        assert entry["foreground_mm3"]["whole_tumour"] == pytest.approx(expected)


def test_brats2018_missing_sequence_names_the_file(brats: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(brats, tmp_path)
    missing = source / "LGG" / "Brats18_TCIA09_141_1" / "Brats18_TCIA09_141_1_t1ce.nii.gz"
    missing.unlink()
    out = tmp_path / "raw" / "brats"
    with pytest.raises(InputDataError, match="missing; a BraTS2018 case folder holds") as caught:
        run_download(real_study(results, brats={"path": str(source), "modality": "MRI"}), "brats", out)
    assert caught.value.path == missing
    assert not out.exists()


def test_brats2018_label_outside_its_set_names_the_file(brats: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(brats, tmp_path)
    seg_path = source / "HGG" / "Brats18_TCIA01_131_1" / "Brats18_TCIA01_131_1_seg.nii.gz"
    seg = brats.labels["Brats18_TCIA01_131_1"].copy()
    seg[seg == 4] = 3  # an MSD value in a BraTS file: 3 is not a BraTS label
    save_nifti(seg_path, seg, brats.affines["Brats18_TCIA01_131_1"], np.uint8)
    out = tmp_path / "raw" / "brats"
    with pytest.raises(InputDataError, match=r"label values \[3\] outside the brats2018 layout's set \[0, 1, 2, 4\]") \
            as caught:
        run_download(real_study(results, brats={"path": str(source), "modality": "MRI"}), "brats", out)
    assert caught.value.path == seg_path
    assert not out.exists()


# --------------------------------------------------------------------------- LUNA16


def test_luna16_becomes_nifti_with_its_geometry(luna: Built, results: Path, tmp_path: Path) -> None:
    config = real_study(results, luna16={"path": str(luna.root), "modality": "CT", "layout": "luna16"})
    out = tmp_path / "raw" / "luna16"
    run_download(config, "luna16", out)

    description = json.loads((out / "dataset.json").read_text())
    assert description["modality"] == {"0": "CT"} and "labels" not in description
    assert all("label" not in entry for entry in description["training"])  # unlabelled: pre-training only
    assert not (out / "labelsTr").exists()
    for uid, origin in zip(LUNA_UIDS, LUNA_ORIGINS, strict=True):
        converted = nib.load(out / "imagesTr" / f"{uid}.nii.gz")
        assert converted.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asarray(converted.dataobj), luna.images[uid])
        # the same geometry as ITK's own NIfTI writer gives: spacing, origin and direction honoured
        np.testing.assert_allclose(converted.affine, luna.affines[uid], atol=1e-4)
        np.testing.assert_allclose(converted.affine[:3, 3], [-origin[0], -origin[1], origin[2]])  # LPS -> RAS

    pretrain_out = tmp_path / "pretrain" / "luna16"
    run_normalise_pretrain(config, "luna16", out, pretrain_out)
    assert len(json.loads((pretrain_out / "manifest.json").read_text())["cases"]) == len(LUNA_UIDS)


def test_luna16_missing_raw_names_the_file(luna: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(luna, tmp_path)
    raw = source / "subset1" / f"{LUNA_UIDS[1]}.raw"
    raw.unlink()
    out = tmp_path / "raw" / "luna16"
    with pytest.raises(InputDataError, match=rf"missing; {LUNA_UIDS[1]}\.mhd names it") as caught:
        run_download(real_study(results, luna16={"path": str(source), "modality": "CT"}), "luna16", out)
    assert caught.value.path == raw
    assert not out.exists()


def test_luna16_short_raw_names_the_file(luna: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(luna, tmp_path)
    raw = source / "subset0" / f"{LUNA_UIDS[0]}.raw"
    size = raw.stat().st_size
    with open(raw, "r+b") as fh:
        fh.truncate(size - 1000)
    out = tmp_path / "raw" / "luna16"
    with pytest.raises(InputDataError, match=rf"{size - 1000} bytes, but .* needs {size} .*truncated") as caught:
        run_download(real_study(results, luna16={"path": str(source), "modality": "CT"}), "luna16", out)
    assert caught.value.path == raw
    assert not out.exists()


# --------------------------------------------------------------------------- LiTS


def test_lits_volumes_and_segmentations_are_linked(lits: Built, results: Path, tmp_path: Path) -> None:
    config = real_study(results, lits={"path": str(lits.root), "modality": "CT"})
    out = tmp_path / "raw" / "lits"
    run_download(config, "lits", out)

    description = json.loads((out / "dataset.json").read_text())
    assert description["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert description["sar3d"]["layout"] == "lits"
    for case, (volume, segmentation) in lits.files.items():
        image, label = out / "imagesTr" / f"{case}.nii", out / "labelsTr" / f"{case}.nii"
        # already NIfTI with the study's labels: linked, not copied (LiTS is ~50 GB)
        assert image.is_symlink() and image.resolve() == volume.resolve()
        assert label.is_symlink() and label.resolve() == segmentation.resolve()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["case"] for c in manifest["cases"]] == ["lits_000", "lits_007"]


def test_lits_missing_segmentation_names_the_file(lits: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(lits, tmp_path)
    missing = source / "Training Batch 2" / "segmentation-7.nii"
    missing.unlink()
    out = tmp_path / "raw" / "lits"
    with pytest.raises(InputDataError, match=r"missing; a LiTS case is volume-<n>\.nii with segmentation") as caught:
        run_download(real_study(results, lits={"path": str(source), "modality": "CT"}), "lits", out)
    assert caught.value.path == missing
    assert not out.exists()


def test_lits_label_outside_its_set_names_the_file(lits: Built, results: Path, tmp_path: Path) -> None:
    source = copy_of(lits, tmp_path)
    seg_path = source / "Training Batch 1" / "segmentation-0.nii"
    seg = lits.labels["lits_000"].copy()
    seg[seg == 2] = 5
    save_nifti(seg_path, seg, lits.affines["lits_000"], np.uint8)
    out = tmp_path / "raw" / "lits"
    with pytest.raises(InputDataError, match=r"label values \[5\] outside the lits layout's set \[0, 1, 2\]") \
            as caught:
        run_download(real_study(results, lits={"path": str(source), "modality": "CT"}), "lits", out)
    assert caught.value.path == seg_path
    assert not out.exists()


# --------------------------------------------------------------------------- layout vs config


def test_config_that_contradicts_the_folder_is_refused_by_key(
    brats: Built, luna: Built, lits: Built, results: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"'datasets\.lits\.modality': MRI, but .* is a lits folder \(CT\)"):
        folder_layout(real_study(results, lits={"path": str(lits.root), "modality": "MRI"}), "lits")
    # a task cannot be built on an unlabelled dataset
    with pytest.raises(ConfigError, match=r"'tasks\.pancreas\.dataset': 'pancreas' is a luna16 folder"):
        folder_layout(real_study(results, pancreas={"path": str(luna.root), "modality": "CT"}), "pancreas")
    with pytest.raises(InputDataError, match=r"not a lits folder: expected volume-<n>\.nii"):
        folder_layout(real_study(results, brats={"path": str(brats.root), "modality": "MRI", "layout": "lits"}),
                      "brats")
    both = tmp_path / "both"
    shutil.copytree(brats.root, both)
    shutil.copytree(luna.root / "subset0", both / "subset0")
    with pytest.raises(InputDataError, match=r"fits several layouts \(brats2018, luna16\)"):
        folder_layout(real_study(results, brats={"path": str(both), "modality": "MRI"}), "brats")
    with pytest.raises(InputDataError, match="no supported layout recognised"):
        folder_layout(real_study(results, brats={"path": str(tmp_path), "modality": "MRI"}), "brats")


def test_a_sequence_on_another_grid_or_a_wrong_channel_count_names_the_file(brats: Built, tmp_path: Path) -> None:
    source = copy_of(brats, tmp_path)
    case = "Brats18_CBICA_AAA_1"
    t2 = source / "HGG" / case / f"{case}_t2.nii.gz"
    save_nifti(t2, brats.images[case][1:, :, :, 3], brats.affines[case], np.int16)  # one slice short
    out = tmp_path / "out-brats"
    out.mkdir()
    with pytest.raises(InputDataError, match="does not match") as caught:
        convert_folder(open_layout(source), out, None, None)
    assert caught.value.path == t2

    # an MSD folder whose dataset.json declares two channels for 3D images
    msd = tmp_path / "msd"
    save_nifti(msd / "imagesTr" / "a.nii.gz", brats.images[case][..., 0], brats.affines[case], np.int16)
    save_nifti(msd / "labelsTr" / "a.nii.gz", task01_labels(brats.labels[case]), brats.affines[case], np.uint8)
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "core", "3": "enh"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    out = tmp_path / "out-msd"
    out.mkdir()
    with pytest.raises(InputDataError, match=r"expected 2 channel\(s\) \(FLAIR, T1w\)") as caught:
        convert_folder(open_layout(msd), out, None, None)
    assert caught.value.path == msd / "imagesTr" / "a.nii.gz"
