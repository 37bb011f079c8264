"""Small dataset folders in the exact native layouts of BraTS2018, LUNA16 and LiTS, from real anatomy.

BraTS-like cases are the real T1 head MRI (mricron's ch2) with four sequences derived
from it and a three-part tumour painted in; LUNA16- and LiTS-like cases are the real
head CT (InVesalius' Cranium) in HU. All are downsampled 4x so a folder takes
well under a second to read. Each builder returns what a test needs to check the
conversion against: the arrays and geometry it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from realdata import head_ct, t1_mri

BRATS_SEQUENCES = ("flair", "t1", "t1ce", "t2")  # the study's channel order (MSD Task01: FLAIR first)


@dataclass
class Built:
    """A folder in a native layout and, per case id, the arrays and affine written into it."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # (X, Y, Z) or (X, Y, Z, C), study order
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # native values
    affines: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)  # the case's files, label last (if any)


def ball(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape[:3])]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), path)
    return path


# --------------------------------------------------------------------------- BraTS2018


def brats_case(index: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Four sequences of one brain and a BraTS label map (1 core, 2 edema, 4 enhancing)."""
    t1, affine = t1_mri()
    t1 = np.flip(t1, axis=0).copy() if index % 2 else t1.copy()  # cases differ: mirrored brain
    centre = (t1.shape[0] // 2 + 5 - 4 * index, t1.shape[1] // 2 + 3, t1.shape[2] // 2 + 2)
    core_r = 1.5 + index
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[ball(t1.shape, centre, core_r + 4)] = 2
    label[ball(t1.shape, centre, core_r + 1)] = 4
    label[ball(t1.shape, centre, core_r)] = 1
    head = t1 > 20
    t2 = np.where(head, 300.0 - t1, 0.0)
    sequences = {
        "t1": t1,
        "t1ce": np.where(label == 4, t1 * 1.8 + 40, t1),
        "t2": np.where(label > 0, t2 + 60, t2),
        "flair": np.where(label == 2, t2 * 0.7 + 90, t2 * 0.7),
    }
    return {k: np.rint(v) for k, v in sequences.items()}, label, affine


def brats2018_folder(root: Path, cases: tuple[tuple[str, str], ...] = (
    ("HGG", "Brats18_CBICA_AAA_1"), ("HGG", "Brats18_TCIA01_131_1"), ("LGG", "Brats18_TCIA09_141_1")),
) -> Built:
    """``root/HGG/<case>/<case>_flair.nii.gz`` ... ``_seg.nii.gz``, as the BraTS 2018 training zip has them."""
    built = Built(root)
    for index, (grade, case) in enumerate(cases):
        sequences, label, affine = brats_case(index)
        folder = root / grade / case
        files = [save_nifti(folder / f"{case}_{s}.nii.gz", sequences[s], affine, np.int16) for s in BRATS_SEQUENCES]
        files.append(save_nifti(folder / f"{case}_seg.nii.gz", label, affine, np.uint8))
        built.images[case] = np.stack([sequences[s] for s in BRATS_SEQUENCES], axis=-1)
        built.labels[case], built.affines[case], built.files[case] = label, affine, files
    return built


# --------------------------------------------------------------------------- LUNA16

LUNA_UIDS = ("1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860",
             "1.3.6.1.4.1.14519.5.2.1.6279.6001.100332161840553388986847034053")
# case 1 is stored with its x and y axes swapped and y reversed, as a scanner may: the direction matters
LUNA_DIRECTIONS = ((1, 0, 0, 0, 1, 0, 0, 0, 1), (0, -1, 0, 1, 0, 0, 0, 0, 1))
LUNA_ORIGINS = ((-195.0, -172.5, -310.25), (120.0, -180.0, -95.5))


def luna16_folder(root: Path) -> Built:
    """``root/subset0/<uid>.mhd`` + ``.raw`` and ``root/subset1/...``, written by SimpleITK as LUNA16's are."""
    import SimpleITK as sitk  # noqa: N813

    hu, spacing = head_ct()
    built = Built(root)
    for index, uid in enumerate(LUNA_UIDS):
        volume = hu if index == 0 else hu[:, 4:-4, 2:].copy()
        image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))  # SimpleITK arrays are (z, y, x)
        image.SetSpacing(spacing)
        image.SetOrigin(LUNA_ORIGINS[index])
        image.SetDirection(LUNA_DIRECTIONS[index])
        header = root / f"subset{index}" / f"{uid}.mhd"
        header.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(header))
        # ITK's own NIfTI writer, the reference for the geometry the conversion must produce
        reference = root.parent / f"{root.name}-reference" / f"{uid}.nii.gz"
        reference.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(reference))
        built.images[uid] = volume
        built.affines[uid] = nib.load(reference).affine
        built.files[uid] = [header, header.with_suffix(".raw")]
    return built


# --------------------------------------------------------------------------- LiTS


def lits_folder(root: Path) -> Built:
    """``root/Training Batch <b>/volume-<n>.nii`` + ``segmentation-<n>.nii`` (1 "liver", 2 tumour)."""
    hu, spacing = head_ct()
    built = Built(root)
    for number, batch in ((0, 1), (7, 2)):
        volume = hu if number == 0 else np.flip(hu, axis=1).copy()
        label = np.zeros(volume.shape, dtype=np.uint8)
        soft = (volume > 0) & (volume < 100)
        label[soft] = 1  # a soft-tissue organ stand-in, on real CT values
        centre = tuple(int(np.median(ix)) for ix in np.nonzero(soft))
        label[ball(volume.shape, centre, 2 + number / 7)] = 2
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = (120.0, 130.0, -80.0 - number)
        folder = root / f"Training Batch {batch}"
        files = [save_nifti(folder / f"volume-{number}.nii", volume, affine, np.int16),
                 save_nifti(folder / f"segmentation-{number}.nii", label, affine, np.uint8)]
        case = f"lits_{number:03d}"
        built.images[case], built.labels[case], built.affines[case], built.files[case] = volume, label, affine, files
    return built
