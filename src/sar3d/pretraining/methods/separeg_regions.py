"""SepaReg's structure-aware separation in 3D: body mask, SLIC supervoxels, region crops, the cached artefact.

Why supervoxels rather than per-slice superpixels: a region of a 3D network's
input should be a 3D structure; SLIC runs natively in 3D with the voxel spacing
and a mask, while per-slice Felzenszwalb regions stacked along z would cut every
organ into slabs one voxel thick. The expensive part (SLIC) runs once per
pre-training volume and is written as one ``.npz`` (the label map and a table
of regions); a region's masked, resized crop is made from it when a batch needs
it, because storing every crop at 64x64x32 float32 would take 512 KB per region.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.segmentation import slic

from sar3d.data.cubes import resize_crops
from sar3d.io import InputDataError, atomic_output
from sar3d.schema import dataclass_from

__all__ = [
    "RegionConfig",
    "Regions",
    "body_mask",
    "compute_regions",
    "load_regions",
    "region_crop",
    "save_regions",
    "supervoxels",
]

_KEYS = ("labels", "region_ids", "lower", "upper", "voxels", "spacing")


@dataclass(frozen=True)
class RegionConfig:
    """Separation settings; the field names are the config block's keys.

    Args:
        threshold: intensity above which a voxel of a [0, 1] volume is body (before the largest component).
        n_segments: SLIC's target number of supervoxels per volume.
        compactness: SLIC's balance of intensity against space (for [0, 1] intensities).
        sigma: Gaussian smoothing (mm, as SLIC scales it by the spacing) before SLIC.
        min_voxels: regions smaller than this are kept in the partition but not used as samples.
        out_size: the network input every region crop is resized to.
    """

    threshold: float = 0.05
    n_segments: int = 48
    compactness: float = 0.1
    sigma: float = 1.0
    min_voxels: int = 64
    out_size: tuple[int, int, int] = (64, 64, 32)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], key: str = "pretrain.separeg.regions") -> RegionConfig:
        """Build from a config block; unknown keys are an error naming ``key``."""
        return dataclass_from(cls, section, key, tuples=("out_size",))


@dataclass(frozen=True)
class Regions:
    """One volume's separation: the label map (0 = outside the body) and a table of sample regions.

    ``lower``/``upper`` are each region's bounding box ``[lower, upper)``;
    ``region_ids`` lists the labels used as samples (those with at least
    ``min_voxels`` voxels), in increasing order.
    """

    labels: np.ndarray
    region_ids: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    voxels: np.ndarray
    spacing: np.ndarray

    def __len__(self) -> int:
        return int(self.region_ids.shape[0])


def body_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels above ``threshold``, largest 26-connected component, holes filled in 3D and per axial slice.

    Why per slice as well: a cavity open at the top or bottom of the scan (the
    airways, a lung cut by the field of view) is not a 3D hole, but it is one in
    each axial slice, which is where the released 2D code filled it.
    """
    foreground = np.asarray(volume) > threshold
    components, n = ndimage.label(foreground, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return foreground
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(components == int(sizes.argmax()))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=in_plane)


def supervoxels(volume: np.ndarray, mask: np.ndarray, spacing: Sequence[float], cfg: RegionConfig) -> np.ndarray:
    """SLIC labels 1..n inside ``mask`` (0 outside); every mask voxel gets a label.

    SLIC can leave a few masked voxels unlabelled where it enforces connectivity;
    they take the label of the nearest labelled voxel, so the regions always
    partition the body.
    """
    labels = slic(
        np.asarray(volume, dtype=np.float64), n_segments=cfg.n_segments, compactness=cfg.compactness,
        sigma=cfg.sigma, spacing=np.asarray(spacing, dtype=np.float64), mask=mask, channel_axis=None,
        start_label=1, enforce_connectivity=True,
    ).astype(np.int32)
    missing = mask & (labels == 0)
    if missing.any():
        _, nearest = ndimage.distance_transform_edt(labels == 0, sampling=spacing, return_indices=True)
        labels[missing] = labels[tuple(index[missing] for index in nearest)]
    labels[~mask] = 0
    return labels


def compute_regions(volume: np.ndarray, spacing: Sequence[float], cfg: RegionConfig,
                    source: str | os.PathLike[str] = "<volume>") -> Regions:
    """Separate one normalised volume into supervoxel regions (the cached artefact's content).

    Raises:
        InputDataError: naming ``source`` when the volume is not 3D or has no body above the threshold.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise InputDataError(source, f"SepaReg needs a 3D volume, got shape {volume.shape}")
    mask = body_mask(volume, cfg.threshold)
    if not mask.any():
        raise InputDataError(source, f"no voxel above the body threshold {cfg.threshold}")
    labels = supervoxels(volume, mask, spacing, cfg)
    boxes = ndimage.find_objects(labels)
    counts = np.bincount(labels.ravel(), minlength=len(boxes) + 1)
    ids = [k for k in range(1, len(boxes) + 1) if boxes[k - 1] is not None and counts[k] >= cfg.min_voxels]
    lower = np.array([[s.start for s in boxes[k - 1]] for k in ids], dtype=np.int32).reshape(-1, 3)
    upper = np.array([[s.stop for s in boxes[k - 1]] for k in ids], dtype=np.int32).reshape(-1, 3)
    return Regions(labels, np.asarray(ids, dtype=np.int32), lower, upper,
                   counts[ids].astype(np.int64), np.asarray(spacing, dtype=np.float64))


def region_crop(volume: np.ndarray, regions: Regions, index: int, out_size: Sequence[int]) -> np.ndarray:
    """Sample region ``index``: the volume times the region's mask, cut to its box, resized to ``out_size``."""
    box = tuple(slice(int(lo), int(up)) for lo, up in zip(regions.lower[index], regions.upper[index], strict=True))
    inside = regions.labels[box] == regions.region_ids[index]
    crop = np.where(inside, np.asarray(volume, dtype=np.float32)[box], 0.0).astype(np.float32)
    return resize_crops(crop[None], out_size)[0]


def save_regions(path: str | os.PathLike[str], regions: Regions) -> None:
    """Write ``regions`` as one compressed ``.npz``, atomically (a crash leaves no partial artefact)."""
    with atomic_output(path) as tmp:
        np.savez_compressed(tmp, **{k: getattr(regions, k) for k in _KEYS})


def load_regions(path: str | os.PathLike[str]) -> Regions:
    """Read an artefact of :func:`save_regions`; a missing key or bad file is an error naming it."""
    try:
        with np.load(Path(path)) as data:
            arrays = {k: data[k] for k in data.files if k in _KEYS}
    except (OSError, ValueError) as err:
        raise InputDataError(path, f"cannot read SepaReg regions ({type(err).__name__}: {err})") from err
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise InputDataError(path, f"not a SepaReg regions file: missing {missing}")
    return Regions(**arrays)
