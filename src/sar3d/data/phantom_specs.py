"""The phantom kinds: what each stands in for, its modality, voxel spacing, field of view,
channels and labels. The case generators (`sar3d.data.phantom_ct`, `sar3d.data.phantom_mri`)
lay out their voxel grids from it; `sar3d.data.phantom` writes it into each folder's dataset.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from sar3d.data.phantom_shapes import Vec3


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom kind stands in for, and the MSD metadata its folder carries."""

    stands_in_for: str
    modality: str  # CT | MRI
    spacing: Vec3
    fov_mm: Vec3
    channels: tuple[str, ...]
    labels: dict[int, str] = field(default_factory=dict)


SPECS: dict[str, PhantomSpec] = {
    "chest_ct": PhantomSpec(
        "LUNA2016 chest CT", "CT", (0.8, 0.8, 2.5), (136.0, 112.0, 75.0), ("CT",),
        {0: "background", 1: "nodule"},
    ),
    "liver_ct": PhantomSpec(
        "LiTS2017 abdominal CT", "CT", (0.8, 0.8, 2.5), (140.0, 120.0, 70.0), ("CT",),
        {0: "background", 1: "liver", 2: "lesion"},
    ),
    "brain_mri": PhantomSpec(
        "BraTS2018 / MSD Task01 brain MRI", "MRI", (1.0, 1.0, 1.0), (96.0, 112.0, 80.0),
        ("FLAIR", "T1w", "t1gd", "T2w"),
        {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
    ),
    "heart_mri": PhantomSpec(
        "MSD Task02 heart MRI", "MRI", (1.25, 1.25, 2.5), (120.0, 120.0, 80.0), ("MRI",),
        {0: "background", 1: "left atrium"},
    ),
    "pancreas_ct": PhantomSpec(
        "MSD Task07 pancreas CT", "CT", (0.8, 0.8, 2.5), (140.0, 120.0, 70.0), ("CT",),
        {0: "background", 1: "pancreas", 2: "cancer"},
    ),
}
