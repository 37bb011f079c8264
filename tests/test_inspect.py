"""`sar3d inspect PATH` on each native test folder, on a converted raw folder, and on broken folders.

Expected numbers are computed here from the arrays the builders wrote, not copied from output.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from native_layouts import LUNA_UIDS, Built, brats2018_folder, lits_folder, luna16_folder, save_nifti
from realdata import CH2, CRANIUM, needs
from sar3d.cli import main
from sar3d.io import voxel_spacing

pytestmark = needs(CH2, CRANIUM)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("native")
    return {"brats2018": brats2018_folder(root / "BraTS2018"), "luna16": luna16_folder(root / "LUNA16"),
            "lits": lits_folder(root / "LiTS")}


def inspect(path: Path, capsys: pytest.CaptureFixture[str], json_path: Path | None = None) -> tuple[int, str]:
    args = ["inspect", str(path), "--no-progress"] + (["--json", str(json_path)] if json_path else [])
    code = main(args)
    return code, capsys.readouterr().out


def mm3(built: Built, case: str, values: tuple[int, ...]) -> float:
    voxel = abs(np.linalg.det(built.affines[case][:3, :3]))
    return float(np.isin(built.labels[case], values).sum()) * voxel


def fmt(values: list[float]) -> str:
    return f"min {min(values):.0f}, median {np.median(values):.0f}, max {max(values):.0f}"


@pytest.mark.parametrize(
    ("layout", "modalities", "tumour"),
    [("brats2018", "FLAIR, T1w, t1gd, T2w", (1, 2, 4)), ("luna16", "CT", None), ("lits", "CT", (2,))],
)
def test_inspect_summarises_each_native_folder(
    native: dict[str, Built], layout: str, modalities: str, tumour: tuple[int, ...] | None,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    built = native[layout]
    code, out = inspect(built.root, capsys, tmp_path / "report.json")
    assert code == 0, out
    n = len(built.images)
    assert f"layout       {layout} (" in out
    assert f"cases        {n} readable of {n} found" in out
    assert f"modalities   {modalities}" in out
    assert "problems     none" in out
    spacings = np.array([voxel_spacing(a) for a in built.affines.values()])
    assert f"spacing mm   min {' x '.join(f'{v:g}' for v in spacings.min(0).round(4))}" in out

    report = json.loads((tmp_path / "report.json").read_text())
    by_case = {c["case"]: c for c in report["cases"]}
    assert set(by_case) == set(built.images)
    for case, image in built.images.items():
        channels = image if image.ndim == 4 else image[..., None]
        expected = [[float(channels[..., c].min()), float(channels[..., c].max())] for c in range(channels.shape[3])]
        assert by_case[case]["intensity"] == expected
        assert by_case[case]["shape"] == list(image.shape[:3])
    if tumour is None:
        assert "labels       none (unlabelled: pre-training only)" in out
        assert all(c["tumour_mm3"] is None for c in report["cases"])
        return
    values = sorted({int(v) for label in built.labels.values() for v in np.unique(label)})
    labels_line = next(line for line in out.splitlines() if line.startswith("  labels "))
    assert [int(v) for v in re.findall(r"(?:labels +|, )(\d+) ", labels_line)] == values
    volumes = {case: mm3(built, case, tumour) for case in built.labels}
    for case, volume in volumes.items():
        assert by_case[case]["tumour_mm3"] == pytest.approx(volume)
    assert f"tumour mm3   {fmt(list(volumes.values()))}" in out


def test_inspect_reads_a_converted_msd_folder(
    native: dict[str, Built], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The raw folder the data stage writes is itself an MSD folder: inspect says so, with Task01's labels."""
    from sar3d.data.convert import convert_folder
    from sar3d.data.layouts import open_layout

    built = native["brats2018"]
    out = tmp_path / "raw"
    out.mkdir()
    convert_folder(open_layout(built.root), out, None, None)
    code, text = inspect(out, capsys)
    assert code == 0, text
    assert "layout       msd (" in text
    assert f"cases        {len(built.images)} readable" in text
    assert "labels       0 background, 1 peritumoral edema, 2 necrotic" in text
    # MSD names every tumour part (edema, tumour core, enhancing): whole tumour as in BraTS
    volumes = [mm3(built, case, (1, 2, 4)) for case in built.labels]
    assert f"tumour mm3   {fmt(volumes)} (labels 1, 2, 3;" in text


def test_inspect_lists_every_problem_of_a_brats_folder(
    native: dict[str, Built], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    built = native["brats2018"]
    source = Path(shutil.copytree(built.root, tmp_path / "BraTS2018"))
    missing = source / "LGG" / "Brats18_TCIA09_141_1" / "Brats18_TCIA09_141_1_t1ce.nii.gz"
    missing.unlink()
    seg_path = source / "HGG" / "Brats18_TCIA01_131_1" / "Brats18_TCIA01_131_1_seg.nii.gz"
    seg = built.labels["Brats18_TCIA01_131_1"].copy()
    seg[seg == 4] = 3
    save_nifti(seg_path, seg, built.affines["Brats18_TCIA01_131_1"], np.uint8)
    code, out = inspect(source, capsys)
    assert code == 1
    assert "cases        1 readable of 3 found" in out
    assert "problems     2 (the data stage would stop on each):" in out
    assert f"    - {missing}: missing; a BraTS2018 case folder holds" in out
    assert f"    - {seg_path}: label values [3] outside the brats2018 layout's set [0, 1, 2, 4]" in out


def test_inspect_lists_every_problem_of_a_luna16_folder(
    native: dict[str, Built], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = Path(shutil.copytree(native["luna16"].root, tmp_path / "LUNA16"))
    missing = source / "subset1" / f"{LUNA_UIDS[1]}.raw"
    missing.unlink()
    short = source / "subset0" / f"{LUNA_UIDS[0]}.raw"
    with open(short, "r+b") as fh:
        fh.truncate(100)
    code, out = inspect(source, capsys)
    assert code == 1
    assert "cases        0 readable of 2 found" in out
    assert f"    - {missing}: missing; {LUNA_UIDS[1]}.mhd names it as its ElementDataFile" in out
    assert f"    - {short}: 100 bytes, but {LUNA_UIDS[0]}.mhd needs" in out


def test_inspect_lists_every_problem_of_a_lits_folder(
    native: dict[str, Built], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    built = native["lits"]
    source = Path(shutil.copytree(built.root, tmp_path / "LiTS"))
    (source / "Training Batch 2" / "segmentation-7.nii").unlink()
    seg_path = source / "Training Batch 1" / "segmentation-0.nii"
    seg = built.labels["lits_000"].copy()
    seg[0, 0, 0] = 5
    save_nifti(seg_path, seg, built.affines["lits_000"], np.uint8)
    code, out = inspect(source, capsys)
    assert code == 1
    assert f"    - {source / 'Training Batch 2' / 'segmentation-7.nii'}: missing;" in out
    assert f"    - {seg_path}: label values [5] outside the lits layout's set [0, 1, 2]" in out


def test_inspect_says_when_no_layout_fits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset")
    code, out = inspect(tmp_path, capsys)
    assert code == 1
    assert "layout       not recognised" in out
    assert "no supported layout recognised (msd: dataset.json" in out
