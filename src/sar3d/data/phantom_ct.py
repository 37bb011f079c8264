"""CT phantoms in HU: a LUNA16-like chest and a contrast-enhanced abdomen with either a
LiTS-like liver task or an MSD Task07-like pancreas task (the kinds ``chest_ct``,
``liver_ct`` and ``pancreas_ct`` of `sar3d.data.phantom`). Each body is painted
tissue by tissue on a canvas, then rendered from the tissue table with texture and noise."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from sar3d.data.phantom_shapes import Canvas, VoxelGrid, irregular_blob, smooth_noise
from sar3d.data.phantom_specs import SPECS

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
        canvas.paint(grid.tube(start, direction, rng.uniform(0.8, 2.5)) & lungs, "blood")

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
        canvas.paint(grid.tube(start, direction, rng.uniform(1.5, 3.0)) & liver, "contrast_blood")
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

