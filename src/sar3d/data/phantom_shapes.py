"""Geometry and noise of the phantoms: a voxel grid in mm, smooth noise, irregular blobs, MRI bias
field and Rician noise, and a tissue canvas. What the anatomies of `sar3d.data.phantom_ct` and
`sar3d.data.phantom_mri` are built from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class VoxelGrid:
    """A voxel grid centred on the world origin, with broadcastable mm coordinates."""

    shape: tuple[int, int, int]
    spacing: Vec3

    @classmethod
    def from_fov(cls, fov_mm: Vec3, spacing: Vec3) -> VoxelGrid:
        shape = tuple(max(1, round(f / s)) for f, s in zip(fov_mm, spacing, strict=True))
        return cls(shape, spacing)  # type: ignore[arg-type]

    @property
    def origin(self) -> np.ndarray:
        return -(np.asarray(self.shape) - 1) / 2.0 * np.asarray(self.spacing)

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-RAS+ affine: axes point right, anterior, superior."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def coords(self, box: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x, y, z (mm) as (n,1,1), (1,n,1), (1,1,n) float32 arrays, optionally inside a box."""
        box = box or tuple(slice(0, n) for n in self.shape)
        axes = []
        for axis, sl in enumerate(box):
            idx = np.arange(sl.start, sl.stop, dtype=np.float32)
            values = self.origin[axis] + idx * self.spacing[axis]
            view = [1, 1, 1]
            view[axis] = values.size
            axes.append(values.astype(np.float32).reshape(view))
        return axes[0], axes[1], axes[2]

    def box(self, centre: Sequence[float], half_mm: float) -> tuple[slice, ...]:
        """Voxel slices of the cube of half side ``half_mm`` around ``centre``, clipped to the grid."""
        out = []
        for axis in range(3):
            lo = (centre[axis] - half_mm - self.origin[axis]) / self.spacing[axis]
            hi = (centre[axis] + half_mm - self.origin[axis]) / self.spacing[axis]
            start = int(np.clip(np.floor(lo), 0, self.shape[axis] - 1))
            stop = int(np.clip(np.ceil(hi) + 1, start + 1, self.shape[axis]))
            out.append(slice(start, stop))
        return tuple(out)

    def ellipsoid(self, centre: Sequence[float], semi_axes: Sequence[float], angle_z: float = 0.0) -> np.ndarray:
        """Normalised ellipsoid level (< 1 inside); ``angle_z`` rotates its axes about z."""
        x, y, z = self.coords()
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        if angle_z:
            cos, sin = math.cos(angle_z), math.sin(angle_z)
            dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
        return (dx / semi_axes[0]) ** 2 + (dy / semi_axes[1]) ** 2 + (dz / semi_axes[2]) ** 2

    def ellipse_xy(self, centre: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
        """Normalised ellipse level in the axial plane, shape (nx, ny, 1): a cylinder along z."""
        x, y, _ = self.coords()
        return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2

    def tube(self, start: Sequence[float], direction: Sequence[float], radius: float) -> np.ndarray:
        """Infinite cylinder through ``start`` along ``direction``."""
        x, y, z = self.coords()
        d = np.asarray(direction, dtype=np.float64)
        d /= np.linalg.norm(d)
        px, py, pz = x - start[0], y - start[1], z - start[2]
        along = px * d[0] + py * d[1] + pz * d[2]
        dist2 = px * px + py * py + pz * pz - along * along
        return dist2 < radius * radius


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                 feature_mm: float) -> np.ndarray:
    """Unit-variance random field with features of about ``feature_mm``; cheap (coarse grid, trilinear)."""
    coarse_shape = [max(2, math.ceil(n * s / feature_mm) + 1) for n, s in zip(shape, spacing, strict=True)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    scale = [(c - 1) / max(n - 1, 1) for c, n in zip(coarse_shape, shape, strict=True)]
    field_ = ndimage.affine_transform(coarse, scale, output_shape=tuple(shape), order=1)
    std = float(field_.std())
    return field_ / std if std > 0 else field_


def rank_fraction(values: np.ndarray) -> np.ndarray:
    """Rank of each value divided by the count: a shape-independent way to split a region by level."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float32)
    ranks[order] = np.arange(values.size, dtype=np.float32) / max(values.size, 1)
    return ranks


def irregular_blob(
    grid: VoxelGrid,
    rng: np.random.Generator,
    centre: Sequence[float],
    volume_mm3: float,
    *,
    roughness: float = 0.25,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """A lobulated, star-shaped blob of exactly ``volume_mm3`` (to one voxel).

    The blob is the set of voxels with the lowest level ``r / R(direction)``, where
    ``R`` is perturbed by a few random low-order lobes, so its shape is irregular yet
    its volume is exact, whatever the spacing. Voxels outside ``allowed`` are never
    chosen. Returns the full-grid mask, the box it lies in and the level inside it.
    """
    radius = (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    box = grid.box(centre, half_mm=2.4 * radius + 2.0 * max(grid.spacing))
    x, y, z = grid.coords(box)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    lobes = np.ones(r.shape, dtype=np.float32)
    for _ in range(4):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        cosine = (dx * direction[0] + dy * direction[1] + dz * direction[2]) / r
        frequency = rng.integers(1, 4)
        lobes = lobes + roughness * rng.uniform(0.3, 1.0) * np.cos(
            math.pi * frequency * cosine + rng.uniform(0, 2 * math.pi)
        ) / 2.0
    texture = smooth_noise(rng, r.shape, grid.spacing, feature_mm=max(radius / 2.0, 2.0))
    level = r / np.maximum(lobes, 0.3) + 0.15 * roughness * radius * texture
    if allowed is not None:
        level = np.where(allowed[box], level, np.inf)
    n_voxels = max(1, round(volume_mm3 / grid.voxel_mm3))
    flat = level.ravel()
    n_voxels = min(n_voxels, int(np.isfinite(flat).sum()))
    chosen = np.argpartition(flat, n_voxels - 1)[:n_voxels]
    inside = np.zeros(flat.size, dtype=bool)
    inside[chosen] = True
    mask = np.zeros(grid.shape, dtype=bool)
    mask[box] = inside.reshape(level.shape)
    return mask, box, level


def bias_field(rng: np.random.Generator, grid: VoxelGrid, strength: float) -> np.ndarray:
    """Smooth multiplicative MRI bias: exp of a very low-frequency field."""
    return np.exp(strength * smooth_noise(rng, grid.shape, grid.spacing, feature_mm=60.0)).astype(np.float32)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise: what an MRI scanner reconstructs."""
    real = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


class Canvas:
    """A tissue-index map painted structure by structure; later strokes cover earlier ones."""

    def __init__(self, grid: VoxelGrid, tissues: Sequence[str], background: str) -> None:
        self.grid = grid
        self.index = {name: i for i, name in enumerate(tissues)}
        self.map = np.full(grid.shape, self.index[background], dtype=np.uint8)

    def paint(self, mask: np.ndarray, tissue: str) -> None:
        self.map[np.broadcast_to(mask, self.grid.shape)] = self.index[tissue]

    def where(self, *tissues: str) -> np.ndarray:
        return np.isin(self.map, [self.index[t] for t in tissues])
