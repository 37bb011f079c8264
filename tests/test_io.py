"""sar3d.io: bad input names the file; outputs appear only when complete; a real MRI round-trips."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sar3d.io import (
    InputDataError,
    atomic_output,
    check_labels,
    check_same_grid,
    load_volume,
    save_volume,
    write_json,
)

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")  # Debian mricron-data: a real T1 head MRI
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def test_truncated_nifti_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "case.nii.gz"
    save_volume(path, np.random.default_rng(0).normal(size=(20, 20, 10)), AFFINE)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputDataError, match="corrupt or truncated") as caught:
        load_volume(path)
    assert caught.value.path == path and str(caught.value).startswith(str(path))


def test_not_a_nifti_and_missing_file_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not gzip")
    with pytest.raises(InputDataError) as caught:
        load_volume(garbage)
    assert caught.value.path == garbage
    with pytest.raises(InputDataError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")


def test_nan_voxels_are_refused(tmp_path: Path) -> None:
    data = np.ones((6, 6, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = tmp_path / "nan.nii.gz"
    save_volume(path, data, AFFINE)
    with pytest.raises(InputDataError, match="2 NaN or infinite") as caught:
        load_volume(path)
    assert caught.value.path == path


def test_atomic_file_left_absent_when_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("job killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_keeps_previous_version_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text('{"version": 2')
        raise RuntimeError("job killed")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_directory_left_absent_when_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    with pytest.raises(RuntimeError), atomic_output(target, directory=True) as tmp:
        (tmp / "imagesTr").mkdir()
        save_volume(tmp / "imagesTr" / "a.nii.gz", np.zeros((4, 4, 4)), AFFINE)
        raise RuntimeError("job killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_appears_complete_on_success(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    with atomic_output(target, directory=True) as tmp:
        assert tmp != target and tmp.name.endswith(".partial") and not target.exists()
        write_json(tmp / "manifest.json", {"ok": True})
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
    assert [p.name for p in target.iterdir()] == ["manifest.json"]


def test_check_labels() -> None:
    label = np.array([[0, 1], [2, 3]], dtype=np.float32)
    check_labels("ok.nii.gz", label, [0, 1, 2, 3])
    with pytest.raises(InputDataError, match=r"\[3\] outside") as caught:
        check_labels("bad.nii.gz", label, [0, 1, 2])
    assert caught.value.path == Path("bad.nii.gz")
    with pytest.raises(InputDataError, match="non-integer"):
        check_labels("soft.nii.gz", label + 0.5, [0, 1, 2, 3])


def test_check_same_grid() -> None:
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    check_same_grid("img", (10, 9, 8, 4), AFFINE, "lab", (10, 9, 8), AFFINE)  # 4D image, 3D label
    with pytest.raises(InputDataError, match="does not match") as caught:
        check_same_grid("img", (10, 9, 8), AFFINE, "lab", (10, 9, 7), AFFINE)
    assert caught.value.path == Path("lab")
    with pytest.raises(InputDataError, match="affine differs"):
        check_same_grid("img", (10, 9, 8), AFFINE, "lab", (10, 9, 8), shifted)


def test_real_mri_round_trips_with_its_affine(tmp_path: Path) -> None:
    data, affine = load_volume(CH2)
    reference = nib.load(CH2)
    assert data.shape == reference.shape and data.dtype == np.float32
    np.testing.assert_allclose(affine, reference.affine)
    assert data.max() > 0
    copy = tmp_path / "ch2_copy.nii.gz"
    save_volume(copy, data, affine)
    again, again_affine = load_volume(copy)
    assert np.array_equal(again, data)
    np.testing.assert_allclose(again_affine, affine, atol=1e-6)
    assert nib.aff2axcodes(again_affine) == nib.aff2axcodes(reference.affine)


def test_atomic_outputs_get_normal_permissions(tmp_path: Path) -> None:
    """Outputs must be readable by the group/others the umask allows (shared clusters)."""
    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
        with atomic_output(tmp_path / "folder", directory=True) as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
