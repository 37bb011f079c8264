"""Deterministic synthetic stand-ins for the paper's datasets (Table 1 and both tasks).

Nothing is shipped: every case is drawn from a generator seeded by the study seed,
the dataset and the case index, so the whole study runs anywhere, offline, and the
same config always gives byte-identical volumes. The phantoms are small (at most
~1.2 M voxels at 1 mm) so the full protocol fits on a laptop CPU, but keep what
the study depends on: CT in HU with air, fat, soft tissue, lung and bone; MRI in
scanner-like units with bias field and Rician noise; anisotropic voxels in a RAS
affine; and, for BraTS, tumours whose volumes spread evenly over the paper's
small/medium/large size buckets.

Geometry is built in millimetres (world coordinates, RAS+: +x patient right,
+y anterior, +z superior) and then sampled on the voxel grid, so a phantom looks
the same whatever its spacing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from sar3d.data.phantom_shapes import (
    Canvas,
    Vec3,
    VoxelGrid,
    bias_field,
    irregular_blob,
    rank_fraction,
    rician,
    smooth_noise,
)
from sar3d.io import save_volume, write_json
from sar3d.seeding import numpy_rng

# Whole-tumour volumes (mm^3) of the brain phantom: cases are spread evenly, in
# log-volume, over the three intervals these knots bound: the inner knots as fixed
# size_buckets_mm3 put a third of the cases in each bucket, and the default tertile
# buckets (`size_buckets_mm3: auto`) land close to them.
BRAIN_TUMOUR_VOLUME_KNOTS_MM3 = (500.0, 4000.0, 16000.0, 50000.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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

# CT tissues: (mean HU, texture standard deviation HU).
CT_TISSUES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "fat": (-100.0, 12.0),
    "muscle": (45.0, 8.0),
    "soft": (35.0, 8.0),
    "lung": (-850.0, 35.0),
    "blood": (40.0, 5.0),
    "contrast_blood": (170.0, 10.0),
    "bone": (750.0, 80.0),
    "marrow": (230.0, 40.0),
    "disc": (85.0, 8.0),
    "csf": (8.0, 4.0),
    "liver": (60.0, 6.0),
    "liver_lesion": (20.0, 10.0),
    "kidney_cortex": (170.0, 12.0),
    "kidney_medulla": (70.0, 10.0),
    "spleen": (110.0, 6.0),
    "fluid": (10.0, 5.0),
    "bowel_wall": (55.0, 8.0),
    "pancreas": (90.0, 10.0),
    "pancreas_tumour": (35.0, 12.0),
    "nodule": (25.0, 25.0),
}

# Brain MRI tissues: mean signal per channel (FLAIR, T1w, T1gd, T2w) and relative texture.
BRAIN_TISSUES: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "outside": ((0.0, 0.0, 0.0, 0.0), 0.0),
    "white": ((380.0, 800.0, 820.0, 520.0), 0.03),
    "grey": ((470.0, 600.0, 620.0, 780.0), 0.04),
    "deep_grey": ((450.0, 640.0, 660.0, 700.0), 0.03),
    "csf": ((90.0, 250.0, 260.0, 2200.0), 0.05),
    "edema": ((880.0, 560.0, 580.0, 1500.0), 0.08),
    "necrotic": ((560.0, 330.0, 350.0, 1900.0), 0.10),
    "enhancing": ((760.0, 620.0, 1450.0, 1150.0), 0.08),
}

# Heart (bSSFP-like) MRI tissues: (mean signal, relative texture).
HEART_TISSUES: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "lung": (25.0, 0.3),
    "fat": (650.0, 0.05),
    "muscle": (200.0, 0.05),
    "myocardium": (250.0, 0.05),
    "blood": (900.0, 0.04),
    "liver": (300.0, 0.05),
    "marrow": (450.0, 0.08),
}


# --------------------------------------------------------------------------- CT bodies


def _ct_image(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    """HU image from a tissue map: tissue mean + textured variation + quantum noise, as int16."""
    names = list(canvas.index)
    means = np.array([CT_TISSUES[n][0] for n in names], dtype=np.float32)
    texture_sd = np.array([CT_TISSUES[n][1] for n in names], dtype=np.float32)
    texture = smooth_noise(rng, canvas.grid.shape, canvas.grid.spacing, feature_mm=4.0)
    hu = means[canvas.map] + texture_sd[canvas.map] * texture
    hu += rng.normal(0.0, rng.uniform(10.0, 20.0), hu.shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _trunk(rng: np.random.Generator, grid: VoxelGrid, interior: str) -> tuple[Canvas, dict[str, float]]:
    """Body outline with skin fat and a muscle wall around an ``interior`` tissue."""
    canvas = Canvas(grid, list(CT_TISSUES), "air")
    half = np.asarray(grid.shape) * np.asarray(grid.spacing) / 2.0
    ax, ay = half[0] * rng.uniform(0.86, 0.93), half[1] * rng.uniform(0.80, 0.88)
    cy = rng.uniform(-2.0, 2.0)
    fat, wall = rng.uniform(3.0, 8.0), rng.uniform(4.0, 7.0)
    canvas.paint(grid.ellipse_xy((0, cy), (ax, ay)) < 1, "fat")
    canvas.paint(grid.ellipse_xy((0, cy), (ax - fat, ay - fat)) < 1, "muscle")
    canvas.paint(grid.ellipse_xy((0, cy), (ax - fat - wall, ay - fat - wall)) < 1, interior)
    body = {"ax": ax, "ay": ay, "cy": cy, "inner_ax": ax - fat - wall, "inner_ay": ay - fat - wall}
    return canvas, body


def _spine(rng: np.random.Generator, canvas: Canvas, body: dict[str, float]) -> None:
    """Vertebral bodies with discs, cortical shell, canal and posterior arch, along z."""
    grid = canvas.grid
    centre_y = body["cy"] - body["ay"] + rng.uniform(22.0, 26.0)
    radius = rng.uniform(8.0, 10.0)
    _, _, z = grid.coords()
    period, phase = rng.uniform(22.0, 28.0), rng.uniform(0.0, 28.0)
    disc = (((z - phase) % period) / period) < 0.18
    vertebra = grid.ellipse_xy((0, centre_y), (radius * 1.15, radius)) < 1
    marrow = grid.ellipse_xy((0, centre_y), (radius * 1.15 - 1.5, radius - 1.5)) < 1
    canal_y = centre_y - radius - 5.0
    arch = grid.ellipse_xy((0, canal_y), (8.0, 7.0)) < 1
    canal = grid.ellipse_xy((0, canal_y), (4.5, 4.0)) < 1
    canvas.paint(arch & ~disc, "bone")
    canvas.paint(vertebra, "bone")
    canvas.paint(marrow & ~disc, "marrow")
    canvas.paint(vertebra & disc, "disc")
    canvas.paint(canal, "csf")
    body["spine_y"] = centre_y
    body["spine_front"] = centre_y + radius


def _tube(grid: VoxelGrid, start: Sequence[float], direction: Sequence[float], radius: float) -> np.ndarray:
    """Infinite cylinder through ``start`` along ``direction``."""
    x, y, z = grid.coords()
    d = np.asarray(direction, dtype=np.float64)
    d /= np.linalg.norm(d)
    px, py, pz = x - start[0], y - start[1], z - start[2]
    along = px * d[0] + py * d[1] + pz * d[2]
    dist2 = px * px + py * py + pz * pz - along * along
    return dist2 < radius * radius


def chest_ct(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LUNA16-like chest CT: lungs with vessels and nodules, mediastinum, ribs, spine."""
    grid = VoxelGrid.from_fov(SPECS["chest_ct"].fov_mm, SPECS["chest_ct"].spacing)
    canvas, body = _trunk(rng, grid, "soft")
    _, _, z = grid.coords()
    ring_outer = grid.ellipse_xy((0, body["cy"]), (body["inner_ax"], body["inner_ay"]))
    ring_inner = grid.ellipse_xy((0, body["cy"]), (body["inner_ax"] - 3.5, body["inner_ay"] - 3.5))
    rib_period, rib_phase = rng.uniform(18.0, 24.0), rng.uniform(0.0, 24.0)
    rib_band = np.cos(2 * math.pi * (z - rib_phase) / rib_period) > 0.35
    canvas.paint((ring_outer < 1) & (ring_inner >= 1) & rib_band, "bone")

    outline = 0.08 * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=25.0)
    lungs = np.zeros(grid.shape, dtype=bool)
    half_z = grid.shape[2] * grid.spacing[2] / 2.0
    for side in (-1.0, 1.0):
        centre = (side * body["inner_ax"] * rng.uniform(0.45, 0.52), body["cy"] + rng.uniform(-3, 3),
                  rng.uniform(-0.2, 0.2) * half_z)
        axes = (body["inner_ax"] * rng.uniform(0.40, 0.46), body["inner_ay"] * rng.uniform(0.70, 0.80),
                half_z * rng.uniform(1.1, 1.5))
        lungs |= grid.ellipsoid(centre, axes) + outline < 1
    heart = grid.ellipsoid((-rng.uniform(4, 10), body["cy"] + rng.uniform(8, 14), -half_z * 0.5),
                           (rng.uniform(20, 26), rng.uniform(16, 20), rng.uniform(22, 30)), angle_z=0.5) < 1
    lungs &= ~heart
    canvas.paint(lungs, "lung")
    canvas.paint(heart, "blood")
    canvas.paint(grid.ellipse_xy((rng.uniform(-8, -4), body["cy"] - body["ay"] + 36.0), (6.0, 6.0)) < 1,
                 "blood")  # descending aorta
    trachea = grid.ellipse_xy((0, body["cy"] + rng.uniform(-2, 2)), (6.5, 6.0)) < 1
    canvas.paint(trachea & (z > half_z * 0.1) & ~lungs, "air")

    for _ in range(int(rng.integers(8, 14))):
        start = (rng.uniform(-0.7, 0.7) * body["inner_ax"], body["cy"] + rng.uniform(-20, 20), 0.0)
        direction = (rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), 1.0)
        canvas.paint(_tube(grid, start, direction, rng.uniform(0.8, 2.5)) & lungs, "blood")

    label = np.zeros(grid.shape, dtype=np.uint8)
    lung_voxels = np.argwhere(lungs)
    for _ in range(int(rng.integers(1, 4))):
        voxel = lung_voxels[rng.integers(len(lung_voxels))]
        centre = grid.origin + voxel * np.asarray(grid.spacing)
        nodule, _, _ = irregular_blob(grid, rng, centre, rng.uniform(30.0, 900.0), roughness=0.2,
                                      allowed=lungs)
        canvas.paint(nodule, "nodule")
        label[nodule] = 1
    _spine(rng, canvas, body)
    return _ct_image(rng, canvas), label, grid.affine


def _abdomen(rng: np.random.Generator, grid: VoxelGrid) -> tuple[Canvas, dict[str, float], np.ndarray]:
    """Contrast-enhanced abdomen: liver, spleen, kidneys, stomach, bowel, aorta, IVC, psoas, spine.

    Returns the canvas, body measures and the liver mask (tasks add lesions or a pancreas).
    """
    canvas, body = _trunk(rng, grid, "fat")
    outline = 0.10 * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=20.0)
    iax, iay, cy = body["inner_ax"], body["inner_ay"], body["cy"]
    half_z = grid.shape[2] * grid.spacing[2] / 2.0
    _spine(rng, canvas, body)
    spine_y = body["spine_y"]
    for side in (-1.0, 1.0):
        canvas.paint(grid.ellipse_xy((side * 16.0, spine_y + 2.0), (7.0, 9.0)) < 1, "muscle")  # psoas
        kidney_centre = (side * iax * rng.uniform(0.50, 0.58), spine_y + rng.uniform(2, 6),
                         rng.uniform(-0.2, 0.2) * half_z)
        kidney_axes = (rng.uniform(10, 13), rng.uniform(14, 17), rng.uniform(24, 32))
        kidney = grid.ellipsoid(kidney_centre, kidney_axes, angle_z=side * 0.4) + outline * 0.5
        canvas.paint(kidney < 1, "kidney_cortex")
        canvas.paint(kidney < 0.35, "kidney_medulla")
    liver = grid.ellipsoid(
        (iax * rng.uniform(0.35, 0.45), cy + rng.uniform(0, 8), half_z * rng.uniform(0.3, 0.6)),
        (iax * rng.uniform(0.50, 0.60), iay * rng.uniform(0.70, 0.80), half_z * rng.uniform(1.1, 1.4)),
        angle_z=rng.uniform(-0.2, 0.2),
    ) + outline < 1
    canvas.paint(liver, "liver")
    canvas.paint(grid.ellipsoid((-iax * 0.62, spine_y + 20.0, half_z * 0.4), (11, 20, 30)) + outline < 1,
                 "spleen")
    stomach = grid.ellipsoid((-iax * rng.uniform(0.25, 0.4), cy + iay * 0.35, half_z * 0.4),
                             (rng.uniform(14, 20), rng.uniform(12, 16), rng.uniform(18, 26))) + outline
    _, _, z = grid.coords()
    canvas.paint(stomach < 1, "bowel_wall")
    canvas.paint(stomach < 0.7, "fluid")
    canvas.paint((stomach < 0.7) & (z > half_z * 0.4 + 6.0), "air")
    for _ in range(int(rng.integers(3, 7))):
        centre = (rng.uniform(-0.6, 0.6) * iax, cy + rng.uniform(0.1, 0.7) * iay, rng.uniform(-1, 0) * half_z)
        loop = grid.ellipsoid(centre, rng.uniform(5.0, 10.0, 3))
        canvas.paint((loop < 1) & ~liver, "bowel_wall")
        canvas.paint((loop < 0.5) & ~liver, "air" if rng.random() < 0.5 else "fluid")
    aorta_y = body["spine_front"] + 7.0
    canvas.paint(grid.ellipse_xy((-4.0, aorta_y), (6.0, 6.0)) < 1, "contrast_blood")
    canvas.paint(grid.ellipse_xy((13.0, aorta_y), (7.0, 5.0)) < 1, "contrast_blood")  # IVC
    body["aorta_y"] = aorta_y
    return canvas, body, liver


def liver_ct(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LiTS-like abdominal CT: liver (1) with hypodense lesions (2)."""
    grid = VoxelGrid.from_fov(SPECS["liver_ct"].fov_mm, SPECS["liver_ct"].spacing)
    canvas, _, liver = _abdomen(rng, grid)
    for _ in range(int(rng.integers(2, 5))):  # portal/hepatic veins inside the liver
        start = grid.origin + np.argwhere(liver)[rng.integers(int(liver.sum()))] * np.asarray(grid.spacing)
        direction = (rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-0.5, 0.5))
        canvas.paint(_tube(grid, start, direction, rng.uniform(1.5, 3.0)) & liver, "contrast_blood")
    label = np.where(liver, 1, 0).astype(np.uint8)
    liver_voxels = np.argwhere(ndimage.binary_erosion(liver, iterations=3))
    for _ in range(int(rng.integers(1, 5))):
        centre = grid.origin + liver_voxels[rng.integers(len(liver_voxels))] * np.asarray(grid.spacing)
        lesion, _, _ = irregular_blob(grid, rng, centre, float(np.exp(rng.uniform(np.log(100), np.log(8000)))),
                                      roughness=0.3, allowed=liver)
        canvas.paint(lesion, "liver_lesion")
        label[lesion] = 2
    return _ct_image(rng, canvas), label, grid.affine


def pancreas_ct(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MSD Task07-like CT: a curved, lobulated pancreas (1) with a hypodense tumour (2)."""
    grid = VoxelGrid.from_fov(SPECS["pancreas_ct"].fov_mm, SPECS["pancreas_ct"].spacing)
    canvas, body, _ = _abdomen(rng, grid)
    x, y, z = grid.coords()
    tail_x, head_x = -body["inner_ax"] * rng.uniform(0.50, 0.60), body["inner_ax"] * rng.uniform(0.15, 0.25)
    mid_x, half_len = (tail_x + head_x) / 2.0, (head_x - tail_x) / 2.0
    along = (x - mid_x) / half_len  # -1 at the tail, +1 at the head
    base_y = body["aorta_y"] + rng.uniform(9.0, 12.0)
    centre_y = base_y + rng.uniform(4.0, 8.0) * (1.0 - along**2) - 4.0 * (along < 0) * along**2
    centre_z = rng.uniform(-8.0, 8.0) - rng.uniform(2.0, 6.0) * along
    taper = np.sqrt(np.clip(1.0 - along**8, 0.0, 1.0))
    thickness_y = (6.5 + 2.5 * along) * taper + 1e-3
    thickness_z = (8.0 + 3.0 * along) * taper + 1e-3
    lobulation = 0.25 * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=6.0)
    level = ((y - centre_y) / thickness_y) ** 2 + ((z - centre_z) / thickness_z) ** 2 + lobulation
    pancreas = (level < 1) & (np.abs(along) < 1)
    canvas.paint(ndimage.binary_dilation(pancreas, iterations=2) & canvas.where("fat"), "fat")
    canvas.paint(pancreas, "pancreas")
    voxels = np.argwhere(pancreas)
    centre = grid.origin + voxels[rng.integers(len(voxels))] * np.asarray(grid.spacing)
    volume = float(np.exp(rng.uniform(np.log(150.0), np.log(6000.0))))
    near = ndimage.binary_dilation(pancreas, iterations=3)
    tumour, _, _ = irregular_blob(grid, rng, centre, volume, roughness=0.3, allowed=near)
    canvas.paint(tumour, "pancreas_tumour")
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[pancreas] = 1
    label[tumour] = 2
    return _ct_image(rng, canvas), label, grid.affine


# --------------------------------------------------------------------------- MRI


def brain_tumour_volume_mm3(rng: np.random.Generator, index: int) -> float:
    """Whole-tumour volume of case ``index``: stratified over the size buckets, not left to chance.

    A golden-ratio sequence over case indices spreads cases evenly over the three
    bucket intervals for any number of cases; the position inside the interval is
    jittered by the case generator but kept off the bucket edges.
    """
    u = (0.5 + index * _GOLDEN) % 1.0
    n_intervals = len(BRAIN_TUMOUR_VOLUME_KNOTS_MM3) - 1
    interval = min(int(u * n_intervals), n_intervals - 1)
    position = float(np.clip(u * n_intervals - interval + rng.uniform(-0.05, 0.05), 0.03, 0.97))
    lo, hi = (math.log(v) for v in BRAIN_TUMOUR_VOLUME_KNOTS_MM3[interval : interval + 2])
    return math.exp(lo + position * (hi - lo))


def brain_mri(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skull-stripped 4-sequence brain MRI (FLAIR, T1w, T1gd, T2w) with a glioma-like tumour."""
    spec = SPECS["brain_mri"]
    grid = VoxelGrid.from_fov(spec.fov_mm, spec.spacing)
    canvas = Canvas(grid, list(BRAIN_TISSUES), "outside")
    half = np.asarray(spec.fov_mm) / 2.0
    axes = half * np.array([rng.uniform(0.85, 0.9), rng.uniform(0.85, 0.9), rng.uniform(0.84, 0.9)])
    brain_level = grid.ellipsoid((0, 0, 0), axes) + 0.04 * smooth_noise(rng, grid.shape, grid.spacing, 20.0)
    brain = brain_level < 1
    canvas.paint(brain, "grey")
    gyri = 0.12 * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=7.0)
    cortex = rng.uniform(3.0, 4.5)
    white = grid.ellipsoid((0, 0, 0), axes - cortex) + gyri < 1
    canvas.paint(white, "white")
    for side in (-1.0, 1.0):
        canvas.paint(grid.ellipsoid((side * 11.0, -2.0, -4.0), (6.0, 9.0, 7.0)) < 1, "deep_grey")
        canvas.paint(grid.ellipsoid((side * rng.uniform(5.0, 7.0), rng.uniform(-2, 4), 6.0),
                                    (rng.uniform(3.0, 5.0), rng.uniform(16.0, 22.0), rng.uniform(4.0, 7.0)),
                                    angle_z=side * 0.15) < 1, "csf")
    x, _, z = grid.coords()
    canvas.paint((np.abs(x) < 1.0) & (z > 0.1 * axes[2]) & brain, "csf")  # interhemispheric fissure

    volume = brain_tumour_volume_mm3(rng, index)
    radius = (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
    room = np.maximum(axes - 0.75 * radius, 3.0)
    direction = rng.standard_normal(3)
    centre = room * direction / np.linalg.norm(direction) * rng.uniform(0.2, 0.8) ** (1 / 3)
    centre[0] = math.copysign(max(abs(centre[0]), min(radius * 0.5, room[0] * 0.8)), centre[0])
    tumour, box, level = irregular_blob(grid, rng, centre, volume, roughness=0.35, allowed=brain)
    label = np.zeros(grid.shape, dtype=np.uint8)
    region = tumour[box]
    # core: the lowest levels of a second, smoother field centred off the whole-tumour centre
    core_level = level + rng.uniform(-0.3, 0.3) * radius * smooth_noise(rng, region.shape, grid.spacing, radius)
    ranks = rank_fraction(core_level[region])
    core_fraction, necrotic_fraction = rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.6)
    values = np.where(ranks < core_fraction * necrotic_fraction, 2, np.where(ranks < core_fraction, 3, 1))
    sub = label[box]
    sub[region] = values.astype(np.uint8)
    label[box] = sub
    for value, tissue in ((1, "edema"), (2, "necrotic"), (3, "enhancing")):
        canvas.paint(label == value, tissue)

    names = list(BRAIN_TISSUES)
    means = np.array([BRAIN_TISSUES[n][0] for n in names], dtype=np.float32)  # (tissues, 4)
    rel_sd = np.array([BRAIN_TISSUES[n][1] for n in names], dtype=np.float32)
    texture = smooth_noise(rng, grid.shape, grid.spacing, feature_mm=3.0)
    shading = (1.0 + rel_sd[canvas.map] * texture) * bias_field(rng, grid, strength=0.12)
    inside = brain
    image = np.zeros((*grid.shape, len(spec.channels)), dtype=np.float32)
    for channel in range(len(spec.channels)):
        gain = rng.uniform(0.8, 1.25)
        signal = means[canvas.map[inside], channel] * shading[inside] * gain
        noisy = rician(rng, signal, sigma=0.025 * gain * float(means[names.index("white"), channel]))
        image[..., channel][inside] = np.round(noisy)
    return image, label, grid.affine


def heart_mri(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MSD Task02-like bSSFP thorax: bright blood pools, dark lungs; label 1 = left atrium."""
    spec = SPECS["heart_mri"]
    grid = VoxelGrid.from_fov(spec.fov_mm, spec.spacing)
    canvas = Canvas(grid, list(HEART_TISSUES), "air")
    half = np.asarray(spec.fov_mm) / 2.0
    ax, ay = half[0] * rng.uniform(0.86, 0.93), half[1] * rng.uniform(0.78, 0.86)
    canvas.paint(grid.ellipse_xy((0, 0), (ax, ay)) < 1, "fat")
    canvas.paint(grid.ellipse_xy((0, 0), (ax - 5, ay - 5)) < 1, "muscle")
    inner = grid.ellipse_xy((0, 0), (ax - 11, ay - 11)) < 1
    canvas.paint(inner, "fat")
    for side in (-1.0, 1.0):
        canvas.paint(grid.ellipsoid((side * (ax - 11) * 0.5, -4.0, 10.0), ((ax - 11) * 0.45, ay * 0.7, 60.0)) < 1,
                     "lung")
    canvas.paint(grid.ellipsoid((ax * 0.3, 0, -half[2] - 10.0), (ax * 0.6, ay * 0.7, 25.0)) < 1, "liver")
    angle = rng.uniform(0.5, 0.8)
    heart_centre = (-rng.uniform(4, 8), rng.uniform(6, 10), rng.uniform(-10, 0))
    lv_axes = (rng.uniform(20, 24), rng.uniform(14, 17), rng.uniform(14, 17))
    canvas.paint(grid.ellipsoid(heart_centre, np.add(lv_axes, 6), angle_z=angle) < 1, "myocardium")
    canvas.paint(grid.ellipsoid(heart_centre, lv_axes, angle_z=angle) < 1, "blood")
    rv_centre = (heart_centre[0] + 12, heart_centre[1] + 12, heart_centre[2])
    canvas.paint(grid.ellipsoid(rv_centre, (16, 9, 14), angle_z=angle) < 1, "blood")
    canvas.paint(grid.ellipsoid((heart_centre[0] + 20, heart_centre[1] - 6, heart_centre[2] + 10), (10, 9, 12))
                 < 1, "blood")  # right atrium
    la_centre = (heart_centre[0] - 2, heart_centre[1] - rng.uniform(18, 22), heart_centre[2] + rng.uniform(10, 16))
    la_axes = (rng.uniform(14, 18), rng.uniform(8, 10), rng.uniform(9, 12))
    outline = 0.1 * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=10.0)
    atrium = grid.ellipsoid(la_centre, la_axes) + outline < 1
    for side in (-1.0, 1.0):  # pulmonary vein stumps, part of the MSD left-atrium label
        vein = _tube(grid, la_centre, (side, rng.uniform(-0.3, 0.1), rng.uniform(-0.3, 0.3)), rng.uniform(3, 4.5))
        atrium |= vein & (grid.ellipsoid(la_centre, np.add(la_axes, 8.0)) < 1)
    canvas.paint(atrium, "blood")
    canvas.paint(grid.ellipse_xy((-6.0, -ay + 34.0), (7.0, 7.0)) < 1, "blood")  # descending aorta
    canvas.paint(grid.ellipse_xy((0, -ay + 20.0), (9.0, 8.0)) < 1, "marrow")  # vertebral body
    names = list(HEART_TISSUES)
    means = np.array([HEART_TISSUES[n][0] for n in names], dtype=np.float32)
    rel_sd = np.array([HEART_TISSUES[n][1] for n in names], dtype=np.float32)
    texture = smooth_noise(rng, grid.shape, grid.spacing, feature_mm=4.0)
    _, y, _ = grid.coords()
    coil = 1.0 + 0.35 * (y / half[1])  # anterior surface coil: brighter in front
    signal = means[canvas.map] * (1.0 + rel_sd[canvas.map] * texture) * coil * bias_field(rng, grid, 0.15)
    image = np.round(rician(rng, signal * rng.uniform(0.8, 1.25), sigma=rng.uniform(12.0, 20.0)))
    return image.astype(np.float32), atrium.astype(np.uint8), grid.affine


# --------------------------------------------------------------------------- public API

_GENERATORS = {
    "chest_ct": lambda rng, index: chest_ct(rng),
    "liver_ct": lambda rng, index: liver_ct(rng),
    "brain_mri": brain_mri,
    "heart_mri": lambda rng, index: heart_mri(rng),
    "pancreas_ct": lambda rng, index: pancreas_ct(rng),
}


def case_id(kind: str, index: int) -> str:
    return f"{kind}_{index:03d}"


def generate_case(
    kind: str, seed_or_rng: int | np.random.Generator, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case as ``(image, label, affine)``.

    An integer seed derives the case's own generator from (seed, kind, index), so
    cases are independent of how many are generated and in which order. CT images
    are int16 HU, MRI float32 (4D, channels last, for ``brain_mri``); labels uint8.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"unknown phantom kind '{kind}' (known: {', '.join(_GENERATORS)})")
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    else:
        rng = numpy_rng(int(seed_or_rng), "phantom", kind, index)
    image, label, affine = _GENERATORS[kind](rng, index)
    return image, label.astype(np.uint8), affine


def dataset_description(kind: str, name: str, training: list[dict[str, str]]) -> dict:
    """MSD-style dataset.json content for a phantom folder."""
    spec = SPECS[kind]
    return {
        "name": name,
        "description": f"sar3d phantom standing in for {spec.stands_in_for}",
        "reference": "synthetic (sar3d.data.phantom)",
        "licence": "CC0",
        "tensorImageSize": "4D" if len(spec.channels) > 1 else "3D",
        "modality": {str(i): c for i, c in enumerate(spec.channels)},
        "labels": {str(k): v for k, v in spec.labels.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }


def write_phantom_dataset(kind: str, n_cases: int, seed: int, out_dir: str | Path, *,
                          name: str | None = None) -> list[dict]:
    """Write ``n_cases`` cases of ``kind`` as an MSD folder (images, labels, dataset.json).

    Returns one record per case (id, relative paths, shape, spacing) for the caller's
    manifest; ``dataset.json`` gets the caller's extra blocks by rewriting it.
    """
    out_dir = Path(out_dir)
    spec = SPECS[kind]
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    records, training = [], []
    for index in range(n_cases):
        image, label, affine = generate_case(kind, seed, index)
        case = case_id(kind, index)
        image_rel, label_rel = f"imagesTr/{case}.nii.gz", f"labelsTr/{case}.nii.gz"
        save_volume(out_dir / image_rel, image, affine, dtype=np.int16 if spec.modality == "CT" else np.float32)
        save_volume(out_dir / label_rel, label, affine, dtype=np.uint8)
        training.append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
        records.append({"case": case, "image": image_rel, "label": label_rel,
                        "shape": list(image.shape), "spacing": list(spec.spacing)})
    write_json(out_dir / "dataset.json", dataset_description(kind, name or kind, training))
    return records

