"""VectorPOSE's view generator: crops of whole volumes, their vector and boundary targets, the corrupted input.

The data side of :mod:`.vectorpose` (which holds the head, the losses and the
registered method); geometry lives in :mod:`.vectorpose_geometry`. Everything
here runs on numpy crops on the CPU (the filters are scipy's and scikit-image's)
and draws every random number from the generator it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.ndimage import median_filter
from skimage.filters import scharr
from torch import Tensor

from sar3d.data.cubes import resize_crops
from sar3d.pretraining.methods.vectorpose_geometry import (
    CropBox,
    Orientation,
    point_vectors,
    sample_box,
    sample_orientation,
    spherical_targets,
)
from sar3d.pretraining.transforms.intensity import nonlinear_intensity
from sar3d.pretraining.transforms.paint import paint_masks
from sar3d.pretraining.transforms.settings import GenesisConfig
from sar3d.pretraining.transforms.shuffle import local_pixel_shuffle
from sar3d.schema import dataclass_from

__all__ = [
    "MEDIANS",
    "VECTORPOSE_CORRUPTION",
    "BoundaryTarget",
    "ConstantPaint",
    "CropDraw",
    "RandomVectorCrop",
    "VectorPoseBatch",
    "VectorPoseConfig",
    "VectorPoseCorruption",
    "VectorPoseViews",
    "separable_median",
]

VECTORPOSE_CORRUPTION = GenesisConfig(
    flip_rate=0.0,  # the released code turns the Models Genesis flip off (orientation is a label here)
    local_shuffle_rate=0.25,
    local_shuffle_windows=5000,
    local_shuffle_max_window=(6, 6, 3),  # <= 10 % of each side, as in Models Genesis
    nonlinear_rate=0.5,
    nonlinear_inverse_rate=0.5,
    paint_rate=0.75,
    inpaint_rate=0.5,
    inpaint_max_boxes=10,
)
"""The released VectorPOSE corruption rates in the project's Genesis fields."""

MEDIANS = ("separable", "cube")
"""The boundary target's median: three 1D passes (the default) or the exact cubic window."""


@dataclass(frozen=True)
class VectorPoseConfig:
    """View and target settings; the field names are the config block's keys.

    Args:
        out_size: network input (the released 96^3 becomes the Models Genesis 64x64x32).
        scale_range: crop extent as a uniform fraction of ``out_size`` voxels of the volume.
        flip_rate: probability of flipping each axis.
        turn_choices: quarter turns drawn per axis (1, 3 = 90 or 270 degrees).
        min_mean: a crop darker than this on average is redrawn (air-only crops teach nothing).
        max_tries: draws per view before the brightest draw is kept.
        median_size: median filter side before the Scharr gradient.
        boundary_median: ``"separable"`` (three 1D medians, :func:`separable_median`) or
            ``"cube"`` (the exact cubic median of the released code).
        boundary_offset, boundary_gain: ``clip((scharr - offset) * gain, 0, 1)``.
        corruption: the Genesis-style corruption of the input.
    """

    out_size: tuple[int, int, int] = (64, 64, 32)
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip_rate: float = 0.5
    turn_choices: tuple[int, ...] = (1, 3)
    min_mean: float = 0.05
    max_tries: int = 10
    median_size: int = 5
    boundary_median: str = "separable"
    boundary_offset: float = 0.01
    boundary_gain: float = 30.0
    corruption: GenesisConfig = field(default=VECTORPOSE_CORRUPTION)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"VectorPoseConfig.scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if self.max_tries < 1:
            raise ValueError(f"VectorPoseConfig.max_tries must be >= 1, got {self.max_tries}")
        if not self.turn_choices:
            raise ValueError("VectorPoseConfig.turn_choices must not be empty")
        if self.boundary_median not in MEDIANS:
            raise ValueError(f"VectorPoseConfig.boundary_median must be one of {MEDIANS}, got {self.boundary_median!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], key: str = "pretrain.vectorpose") -> VectorPoseConfig:
        """Build from a config block; unknown keys are an error naming ``key``."""
        values = dict(section)
        if "corruption" in values:
            merged = {f.name: getattr(VECTORPOSE_CORRUPTION, f.name) for f in fields(GenesisConfig)}
            values["corruption"] = GenesisConfig.from_config({**merged, **values["corruption"]})
        return dataclass_from(cls, values, key, tuples=("out_size", "scale_range", "turn_choices"))


class CropDraw(NamedTuple):
    """One view's random draw: the box in the volume and the orientation applied after cropping."""

    box: CropBox
    orientation: Orientation


class RandomVectorCrop:
    """A crop at a random scale and position, flipped and rotated, with its 9 spherical vector targets.

    Why cut the box in the source frame with permuted extents: a 90-degree turn in
    a plane containing the 32-voxel axis would make a 64x64x32 crop 64x32x64; the
    box is drawn with the extent that the orientation turns into
    ``scale * out_size``, so the full released rotation scheme applies and no
    axis is stretched.

    Args:
        cfg: the view settings.
    """

    def __init__(self, cfg: VectorPoseConfig) -> None:
        self.cfg = cfg

    def randomize(self, volume_shape: Sequence[int], generator: torch.Generator) -> CropDraw:
        lo, hi = self.cfg.scale_range
        scale = lo + (hi - lo) * float(torch.rand((), generator=generator, device=generator.device))
        orientation = sample_orientation(generator, self.cfg.flip_rate, self.cfg.turn_choices)
        extent = orientation.source_shape([scale * s for s in self.cfg.out_size])
        return CropDraw(sample_box(volume_shape, extent, generator), orientation)

    def apply(self, volume: np.ndarray, draw: CropDraw) -> tuple[np.ndarray, Tensor]:
        """The oriented crop resized to ``out_size`` (float32) and its (9, 3) targets."""
        crop = torch.from_numpy(np.ascontiguousarray(volume[draw.box.slices()], dtype=np.float32))
        oriented = draw.orientation.apply(crop).numpy()
        image = resize_crops(oriented[None], self.cfg.out_size)[0]
        vectors = point_vectors(draw.box, volume.shape) @ draw.orientation.matrix().T
        return image, spherical_targets(vectors, volume.shape)

    def __call__(self, volume: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, Tensor]:
        best = self.randomize(volume.shape, generator)
        best_mean = float(volume[best.box.slices()].mean())
        for _ in range(self.cfg.max_tries - 1):
            if best_mean >= self.cfg.min_mean:
                break
            draw = self.randomize(volume.shape, generator)
            mean = float(volume[draw.box.slices()].mean())
            if mean > best_mean:
                best, best_mean = draw, mean
        return self.apply(volume, best)


def separable_median(image: np.ndarray, size: int = 5) -> np.ndarray:
    """Median of ``size`` voxels along x, then along y, then along z (scipy's ``reflect`` borders).

    Why: it approximates the released ``size``-cubed median at a fraction of the
    cost. scipy's exact 5x5x5 median took 160-220 ms per 64x64x32 view on one
    thread (load 1 to 3.5), over 90 % of VectorPOSE's ``make_views``, which
    was 20-33 % of a demo-width training step against the 10 % goal; the three
    1D passes take ~23 ms and cut ``make_views`` ~7x (docs/performance.md).
    It is not the same filter (a median of medians is not the median), so the
    boundary target differs somewhat (docs/deviations.md, "VectorPOSE and
    SepaReg"); ``boundary_median: cube`` restores the exact one.
    """
    out = np.asarray(image, dtype=np.float32)
    for axis in range(out.ndim):
        window = [1] * out.ndim
        window[axis] = size
        out = median_filter(out, size=window)
    return out


class BoundaryTarget:
    """Boundary map of a clean crop: ``clip((scharr(median(y)) - offset) * gain, 0, 1)``.

    Why the median filter: it removes speckle so that the Scharr magnitude marks
    structure edges rather than noise; offset and gain map faint gradients to 0
    and clear edges to 1.

    Args:
        median_size: side of the median window.
        offset: gradient magnitude mapped to 0.
        gain: scale after the offset.
        median: ``"separable"`` (:func:`separable_median`, the default) or
            ``"cube"`` (scipy's exact ``median_size``-cubed median).
    """

    def __init__(self, median_size: int = 5, offset: float = 0.01, gain: float = 30.0,
                 median: str = "separable") -> None:
        if median not in MEDIANS:
            raise ValueError(f"BoundaryTarget median must be one of {MEDIANS}, got {median!r}")
        self.median_size = median_size
        self.offset = offset
        self.gain = gain
        self.median = median

    def smooth(self, clean: np.ndarray) -> np.ndarray:
        """The median-filtered crop that the Scharr gradient sees."""
        image = np.asarray(clean, dtype=np.float32)
        if self.median == "cube":
            return median_filter(image, size=self.median_size)
        return separable_median(image, self.median_size)

    def __call__(self, clean: np.ndarray) -> np.ndarray:
        smooth = self.smooth(clean)
        edges = scharr(smooth)
        return np.clip((edges - self.offset) * self.gain, 0.0, 1.0).astype(np.float32)


class ConstantPaint:
    """In-/out-painting with one constant per cube instead of noise (the released VectorPOSE fill).

    The boxes come from the project's :func:`sar3d.transforms.paint_masks`, so box
    sizes, counts and rates are those of ``cfg``.

    Args:
        cfg: the painting rates and sizes.
    """

    def __init__(self, cfg: GenesisConfig) -> None:
        self.cfg = cfg

    def randomize(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = cubes.shape[0]
        mask, _ = paint_masks(n, tuple(cubes.shape[2:]), generator, self.cfg, cubes.device)
        values = torch.rand((n,), generator=generator, device=cubes.device, dtype=cubes.dtype)
        return mask, values

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> Tensor:
        mask, values = self.randomize(cubes, generator)
        return torch.where(mask.unsqueeze(1), values.view(-1, 1, 1, 1, 1), cubes)


class VectorPoseCorruption:
    """Local shuffle, Bezier intensity curve, constant painting; no flip (the released order and rates).

    Args:
        cfg: the Genesis-style rates (:data:`VECTORPOSE_CORRUPTION` by default).
    """

    def __init__(self, cfg: GenesisConfig = VECTORPOSE_CORRUPTION) -> None:
        self.cfg = cfg
        self.paint = ConstantPaint(cfg)

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> Tensor:
        x = local_pixel_shuffle(cubes, generator, self.cfg)
        x = nonlinear_intensity(x, generator, self.cfg)
        return self.paint(x, generator)


class VectorPoseBatch(NamedTuple):
    """One batch: corrupted input, clean and boundary targets (B, 1, X, Y, Z), vector targets (B, 9, 3)."""

    inputs: Tensor
    clean: Tensor
    boundary: Tensor
    vectors: Tensor


class VectorPoseViews:
    """``per_volume`` views of each whole normalised volume, with every target, from one generator.

    Args:
        cfg: the view settings.
    """

    def __init__(self, cfg: VectorPoseConfig) -> None:
        self.cfg = cfg
        self.crop = RandomVectorCrop(cfg)
        self.boundary = BoundaryTarget(cfg.median_size, cfg.boundary_offset, cfg.boundary_gain,
                                       cfg.boundary_median)
        self.corrupt = VectorPoseCorruption(cfg.corruption)

    def __call__(self, volumes: Sequence[np.ndarray], per_volume: int, generator: torch.Generator) -> VectorPoseBatch:
        """Views of ``volumes`` (numpy, on the CPU: the filters are scipy's); tensors on the generator's device."""
        images, targets = [], []
        for volume in volumes:
            if volume.ndim != 3:
                raise ValueError(f"VectorPOSE needs 3D volumes (X, Y, Z), got shape {volume.shape}")
            for _ in range(per_volume):
                image, target = self.crop(volume, generator)
                images.append(image)
                targets.append(target)
        device = generator.device
        clean = torch.from_numpy(np.stack(images))[:, None].to(device)
        boundary = torch.from_numpy(np.stack([self.boundary(y) for y in images]))[:, None].to(device)
        return VectorPoseBatch(self.corrupt(clean, generator), clean, boundary, torch.stack(targets).to(device))
