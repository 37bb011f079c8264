"""VectorPOSE geometry: crop boxes, the 9 points, their vectors and spherical targets, orientations.

Coordinates are continuous voxel coordinates of the volume in the project's
(x, y, z) order, voxel ``i`` covering ``[i, i + 1)``, so a crop box is
``[lower, lower + size)`` and its centre is ``lower + size / 2``. The released
code works in (D, H, W) with D the slice axis; here z (the 32-voxel axis of the
64x64x32 input) plays D, x plays H and y plays W, so the spherical encoding is

* ``r = |v| / R`` clipped to 1, ``R = sqrt((X/2)^2 + (Y/2)^2)`` (the in-plane half-diagonal);
* ``theta = arccos(v_y / |v|) / pi`` in [0, 1] (W is the polar axis);
* ``phi = atan2(v_x, v_z) / pi`` in [-1, 1] (H over D);

and a zero vector gives ``theta = phi = 0``.

Orientation: every 90-degree rotation and flip is a signed permutation of the
axes, so the image transform (``torch.flip`` / ``torch.rot90``) and the vector
transform (one integer 3x3 matrix) are exact and agree by construction; the
tests check them against the transformed image itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "N_POINTS",
    "CropBox",
    "Orientation",
    "crop_points",
    "point_vectors",
    "sample_box",
    "sample_orientation",
    "spherical_targets",
]

N_POINTS = 9
"""Crop centre and its 8 corners."""

# corners as (lower|upper) per axis, in the released order after the centre:
# lower, upper, (l,u,u), (u,l,l), (l,l,u), (u,u,l), (l,u,l), (u,l,u)
_CORNERS = ((0, 0, 0), (1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1), (1, 1, 0), (0, 1, 0), (1, 0, 1))

# the plane each rotation axis turns: rotation about axis a is rot90 in the other two axes
_PLANES = ((1, 2), (0, 2), (0, 1))


@dataclass(frozen=True)
class CropBox:
    """A crop of a volume: ``[lower, lower + size)`` per axis, in voxels."""

    lower: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def upper(self) -> tuple[int, int, int]:
        return tuple(lo + s for lo, s in zip(self.lower, self.size, strict=True))  # type: ignore[return-value]

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, up) for lo, up in zip(self.lower, self.upper, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class Orientation:
    """Flip each axis (``flips``), then rotate about axes 0, 1, 2 by ``turns`` quarter turns each.

    ``turns[a]`` is the ``k`` of ``torch.rot90(k, dims=plane of a)``: the released
    scheme draws 90 or 270 degrees per axis, i.e. 1 or 3.
    """

    flips: tuple[bool, bool, bool]
    turns: tuple[int, int, int]

    def apply(self, image: Tensor) -> Tensor:
        """Transform the last three axes of ``image`` (flips first, then the rotations in axis order)."""
        offset = image.dim() - 3
        flip_dims = [offset + a for a in range(3) if self.flips[a]]
        out = image.flip(flip_dims) if flip_dims else image
        for axis, k in enumerate(self.turns):
            if k % 4:
                b, c = _PLANES[axis]
                out = torch.rot90(out, k, dims=(offset + b, offset + c))
        return out

    def matrix(self) -> np.ndarray:
        """The integer 3x3 matrix ``M`` with ``v_after = M @ v_before`` for displacement vectors.

        ``torch.rot90(k=1, dims=(b, c))`` sends index ``(p_b, p_c)`` to
        ``(n_c - p_c, p_b)`` in continuous coordinates, i.e. ``(-v_c, v_b)`` for a
        vector; a flip negates its axis.
        """
        m = np.diag([-1 if f else 1 for f in self.flips]).astype(np.int64)
        for axis, k in enumerate(self.turns):
            b, c = _PLANES[axis]
            quarter = np.eye(3, dtype=np.int64)
            quarter[b, b], quarter[b, c], quarter[c, b], quarter[c, c] = 0, -1, 1, 0
            m = np.linalg.matrix_power(quarter, k % 4) @ m
        return m

    def source_shape(self, out_shape: Sequence[float]) -> tuple[float, float, float]:
        """The extent a box needs before :meth:`apply` so that it has ``out_shape`` after."""
        perm = np.abs(self.matrix())
        return tuple(float(v) for v in perm.T @ np.asarray(out_shape, dtype=np.float64))  # type: ignore[return-value]


def sample_orientation(generator: torch.Generator, flip_rate: float = 0.5,
                       turn_choices: Sequence[int] = (1, 3)) -> Orientation:
    """Each axis flipped with ``flip_rate``, then each axis turned by a uniform choice of ``turn_choices``."""
    u = torch.rand(3, generator=generator, device=generator.device)
    pick = torch.randint(0, len(turn_choices), (3,), generator=generator, device=generator.device)
    return Orientation(tuple(bool(v < flip_rate) for v in u),  # type: ignore[arg-type]
                       tuple(int(turn_choices[int(i)]) for i in pick))  # type: ignore[arg-type]


def sample_box(volume_shape: Sequence[int], extent: Sequence[float], generator: torch.Generator) -> CropBox:
    """A box of ``extent`` voxels (rounded) at a uniform position inside the volume.

    A box larger than the volume on any axis shrinks on every axis by the same
    factor (the released ``sample_crop``), so the aspect is kept.
    """
    shape = np.asarray(volume_shape, dtype=np.float64)
    ext = np.asarray(extent, dtype=np.float64)
    fit = float(np.min(shape / ext))
    if fit < 1.0:
        ext = ext * fit
    size = [int(min(n, max(1, math.floor(e + 0.5)))) for n, e in zip(volume_shape, ext, strict=True)]
    lower = [int(torch.randint(0, int(n) - s + 1, (1,), generator=generator, device=generator.device)) for n, s in
             zip(volume_shape, size, strict=True)]
    return CropBox(tuple(lower), tuple(size))  # type: ignore[arg-type]


def crop_points(box: CropBox) -> np.ndarray:
    """(9, 3) float64: the crop centre, then its 8 corners in the released order."""
    lower = np.asarray(box.lower, dtype=np.float64)
    upper = np.asarray(box.upper, dtype=np.float64)
    corners = [np.where(np.asarray(c, dtype=bool), upper, lower) for c in _CORNERS]
    return np.stack([(lower + upper) / 2.0, *corners])


def point_vectors(box: CropBox, volume_shape: Sequence[int]) -> np.ndarray:
    """(9, 3) vectors from each point to the patch-adjusted volume centre (X/2, Y/2, crop centre z)."""
    points = crop_points(box)
    target = np.array([volume_shape[0] / 2.0, volume_shape[1] / 2.0, points[0, 2]])
    return target[None, :] - points


def spherical_targets(vectors: np.ndarray | Tensor, volume_shape: Sequence[int]) -> Tensor:
    """(..., 3) ``[r, theta, phi]`` of (..., 3) vectors, as in the module docstring (float32)."""
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
    radius = math.hypot(volume_shape[0] / 2.0, volume_shape[1] / 2.0)
    norm = v.norm(dim=-1)
    safe = norm.clamp_min(1e-12)
    r = (norm / radius).clamp_max(1.0)
    theta = torch.where(norm > 0, torch.arccos((v[..., 1] / safe).clamp(-1.0, 1.0)) / math.pi, 0.0)
    phi = torch.where(norm > 0, torch.atan2(v[..., 0], v[..., 2]) / math.pi, 0.0)
    return torch.stack((r, theta, phi), dim=-1).float()
