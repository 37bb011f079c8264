"""MRI phantoms in scanner-like units, with bias field and Rician noise: a skull-stripped
4-sequence brain with a glioma-like tumour (BraTS-like, ``brain_mri``) and a bSSFP-like
thorax with the left atrium labelled (MSD Task02-like, ``heart_mri``)."""

from __future__ import annotations

import math

import numpy as np

from sar3d.data.phantom_shapes import (
    Canvas,
    VoxelGrid,
    bias_field,
    irregular_blob,
    rank_fraction,
    rician,
    smooth_noise,
)
from sar3d.data.phantom_specs import SPECS

# Whole-tumour volumes (mm^3) of the brain phantom: cases are spread evenly, in
# log-volume, over the three intervals these knots bound: the inner knots as fixed
# size_buckets_mm3 put a third of the cases in each bucket, and the default tertile
# buckets (`size_buckets_mm3: auto`) land close to them.
BRAIN_TUMOUR_VOLUME_KNOTS_MM3 = (500.0, 4000.0, 16000.0, 50000.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

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
        vein = grid.tube(la_centre, (side, rng.uniform(-0.3, 0.1), rng.uniform(-0.3, 0.3)), rng.uniform(3, 4.5))
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
