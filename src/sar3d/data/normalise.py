"""Spatial and intensity normalisation of a raw MSD-style dataset (paper section 3.1/3.2).

Every volume is resampled to one voxel spacing (3rd-order spline for images,
nearest neighbour for labels) so that a crop of a given *fraction* of a volume
means the same physical size in every dataset, then normalised:

* pre-training: clip to the modality's range (CT [-1000, 1000] HU, MRI
  [0, 4000]), then map each volume on its own to [0, 1] (its 0th and 99.5th
  intensity percentiles to 0 and 1, ``preprocess.pretrain_scaling: minmax``),
  or the clip range linearly to [0, 1] (``fixed``);
* brain tumour task: z-score over the non-zero (brain) region, background kept 0;
* pancreas task: clip [-96, 215] HU, subtract 77.99, divide by 75.40.

The output folder is written atomically, manifest last (docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from tqdm import tqdm

from sar3d.io import (
    InputDataError,
    atomic_output,
    check_labels,
    check_same_grid,
    load_volume,
    read_json,
    save_volume,
    voxel_spacing,
    write_json,
)
from sar3d.paths import MANIFEST
from sar3d.tracking import tracked_run

log = logging.getLogger(__name__)

# Pancreas preprocessing of the paper's reference [8] (nnU-Net's CT statistics).
PANCREAS_CLIP = (-96.0, 215.0)
PANCREAS_MEAN = 77.99
PANCREAS_STD = 75.40
SPLINE_ORDER = 3


@dataclass(frozen=True)
class RawCase:
    """One training entry of a raw dataset.json."""

    case: str
    image: Path
    label: Path | None


def case_id(path: str | Path) -> str:
    """Case id from an MSD file name: ``./imagesTr/BRATS_001.nii.gz`` -> ``BRATS_001``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_raw_cases(raw: Path) -> list[RawCase]:
    """The training cases listed in ``raw/dataset.json`` (the only source of truth on case ids)."""
    spec_path = raw / "dataset.json"
    if not spec_path.exists():
        raise InputDataError(spec_path, "file does not exist (is the raw dataset complete?)")
    spec = read_json(spec_path)
    entries = spec.get("training") if isinstance(spec, dict) else None
    if not entries:
        raise InputDataError(spec_path, "no 'training' cases listed")
    cases: list[RawCase] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputDataError(spec_path, f"training entry without an 'image': {entry!r}")
        cid = case_id(entry["image"])
        if cid in seen:
            raise InputDataError(spec_path, f"case '{cid}' listed twice")
        seen.add(cid)
        label = entry.get("label")
        cases.append(RawCase(cid, raw / entry["image"], raw / label if label else None))
    return cases


def resample_to_spacing(
    volumes: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *, label: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Resample channel-first ``volumes`` (C, X, Y, Z) to ``spacing`` mm with MONAI ``Spacing``.

    Images use a 3rd-order spline (the paper), labels nearest neighbour so no new
    label values appear. Orientation and the world position of voxel 0 are kept;
    only the voxel size changes, so the returned affine is the old one with
    rescaled columns. Volumes already on the spacing are returned untouched.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if np.allclose(voxel_spacing(affine), spacing, rtol=0, atol=1e-6):
        return volumes.astype(np.float32, copy=False), affine
    resampler = Spacing(
        pixdim=tuple(float(s) for s in spacing),
        mode="nearest" if label else SPLINE_ORDER,
        padding_mode="nearest",
        dtype=np.float32 if label else np.float64,
    )
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32)), affine=affine)
    out = resampler(image)
    return out.numpy().astype(np.float32, copy=False), np.asarray(out.affine, dtype=np.float64)


def scale_to_unit(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map that fixed range linearly to [0, 1] (``pretrain_scaling: fixed``).

    One intensity means the same in every volume (0 HU -> 0.5), but an MRI whose
    signal sits far below the clip maximum lands in a narrow band near 0.
    """
    if high <= low:
        raise ValueError(f"empty clip range [{low}, {high}]")
    out = (np.clip(volume, low, high) - low) / (high - low)
    return out.astype(np.float32)


def minmax_to_unit(volume: np.ndarray, low: float, high: float, percentiles: Sequence[float]) -> np.ndarray:
    """Clip to [low, high], then map this volume's own percentiles to 0 and 1 (``pretrain_scaling: minmax``).

    The paper normalises "each volume independently to [0, 1]" after clipping.
    The upper anchor is a high percentile rather than the maximum because a few
    voxels (spline overshoot, noise, vessels) would otherwise set the scale of
    the whole volume; when the volume is so sparse that the percentile equals
    the minimum, the maximum is used.

    Raises:
        ValueError: the clipped volume is constant, so no range can be mapped.
    """
    if high <= low:
        raise ValueError(f"empty clip range [{low}, {high}]")
    clipped = np.clip(volume, low, high)
    bottom, top = np.percentile(clipped, percentiles)
    if top <= bottom:
        top = clipped.max()
    if top <= bottom:
        raise ValueError(f"constant intensity {float(bottom):g} after clipping to [{low:g}, {high:g}]")
    out = np.clip((clipped - bottom) / (top - bottom), 0.0, 1.0)
    return out.astype(np.float32)


def pretrain_intensities(
    volume: np.ndarray, preprocess: Mapping[str, Any], modality: str, path: Path, channel: int
) -> np.ndarray:
    """One resampled pre-training volume mapped to [0, 1] as ``preprocess`` says; bad input names the file."""
    low, high = preprocess["clip"][modality]
    if preprocess["pretrain_scaling"] == "fixed":
        return scale_to_unit(volume, low, high)
    try:
        return minmax_to_unit(volume, low, high, preprocess["minmax_percentiles"])
    except ValueError as err:
        raise InputDataError(path, f"channel {channel}: cannot normalise to [0, 1] per volume ({err})") from err


def zscore_nonzero(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score with the mean/std of the non-zero (brain) region; outside stays exactly 0."""
    region = volume != 0 if mask is None else np.asarray(mask, dtype=bool)
    values = volume[region].astype(np.float64)
    if values.size < 2:
        raise ValueError("the non-zero region is empty")
    std = values.std()
    if std <= 0:
        raise ValueError("the non-zero region has zero variance")
    out = np.where(region, (volume - values.mean()) / std, 0.0)
    return out.astype(np.float32)


def ct_pancreas(volume: np.ndarray) -> np.ndarray:
    """The pancreas task's fixed CT normalisation (paper section 3.2.2)."""
    out = (np.clip(volume, *PANCREAS_CLIP) - PANCREAS_MEAN) / PANCREAS_STD
    return out.astype(np.float32)


def select_channels(data: np.ndarray, channels: Sequence[int], path: Path) -> np.ndarray:
    """Channel-first stack of the wanted channels of a 3D or channels-last 4D volume."""
    if data.ndim == 3:
        if any(c != 0 for c in channels):
            raise InputDataError(path, f"3D image has only channel 0, config asks for {list(channels)}")
        return data[None]
    if data.ndim == 4:
        if max(channels) >= data.shape[3]:
            raise InputDataError(path, f"image has {data.shape[3]} channel(s), config asks for {list(channels)}")
        return np.stack([data[..., c] for c in channels])
    raise InputDataError(path, f"expected a 3D or 4D image, got shape {data.shape}")


def class_volumes_mm3(label: np.ndarray, affine: np.ndarray, classes: Mapping[str, Sequence[int]]) -> dict:
    """True volume (mm^3) of every evaluated class, on the label's own grid and spacing."""
    voxel_mm3 = float(np.prod(voxel_spacing(affine)))
    return {name: float(np.isin(label, list(values)).sum()) * voxel_mm3 for name, values in classes.items()}


def _manifest(purpose: str, dataset: str, task: str | None, modality: str, spacing, cases: list) -> dict:
    return {
        "purpose": purpose,
        "dataset": dataset,
        "task": task,
        "modality": modality,
        "spacing": [float(s) for s in spacing],
        "cases": cases,
    }


def run_normalise_pretrain(config: Mapping[str, Any], dataset: str, raw: Path, out: Path) -> None:
    """Resample every wanted channel of every case and map it to [0, 1] for pre-training."""
    raw, out = Path(raw), Path(out)
    modality = config["datasets"][dataset]["modality"]
    channels = list(config["pretrain"]["datasets"][dataset]["channels"])
    spacing = config["preprocess"]["spacing"]
    params = {
        "preprocess": config["preprocess"],
        "dataset": config["datasets"][dataset],
        "channels": channels,
    }
    with tracked_run(config, "normalise", {"dataset": dataset}, params=params) as run:
        start = time.perf_counter()
        raw_cases = read_raw_cases(raw)
        entries: list[dict[str, Any]] = []
        with atomic_output(out, directory=True) as tmp:
            for rc in tqdm(raw_cases, desc=f"normalise {dataset}", unit="case"):
                data, affine = load_volume(rc.image)
                stack = select_channels(data, channels, rc.image)
                del data
                stack, new_affine = resample_to_spacing(stack, affine, spacing)
                for channel, volume in zip(channels, stack, strict=True):
                    rel = f"images/{rc.case}_c{channel}.nii.gz"
                    unit = pretrain_intensities(volume, config["preprocess"], modality, rc.image, channel)
                    save_volume(tmp / rel, unit, new_affine)
                    entries.append(
                        {
                            "case": rc.case,
                            "channel": channel,
                            "image": rel,
                            "label": None,
                            "shape": [int(s) for s in volume.shape],
                            "foreground_mm3": {},
                        }
                    )
            write_json(tmp / MANIFEST, _manifest("pretrain", dataset, None, modality, spacing, entries))
        seconds = time.perf_counter() - start
        run.metrics({"n_cases": len(raw_cases), "n_volumes": len(entries), "seconds": seconds})
    log.info("normalised %d volumes of %s in %.1f s", len(entries), dataset, seconds)


def _normalise_task_image(method: str, image: np.ndarray, nonzero: np.ndarray, path: Path) -> np.ndarray:
    try:
        if method == "zscore_nonzero":
            return zscore_nonzero(image, nonzero)
        if method == "ct_pancreas":
            return ct_pancreas(image)
    except ValueError as err:
        raise InputDataError(path, f"cannot normalise ({err})") from err
    raise ValueError(f"unknown normalisation '{method}'")


def run_normalise_task(config: Mapping[str, Any], task: str, raw: Path, out: Path) -> None:
    """Resample image and label of every case of a task's dataset and apply the task's normalisation.

    For z-score the non-zero (brain) mask is taken on the original grid and
    resampled nearest-neighbour, so spline ringing in the background never joins
    the statistics and the background stays exactly 0.
    """
    raw, out = Path(raw), Path(out)
    spec = config["tasks"][task]
    dataset = spec["dataset"]
    modality = config["datasets"][dataset]["modality"]
    channel = int(spec["channel"])
    spacing = config["preprocess"]["spacing"]
    params = {"preprocess": {"spacing": spacing}, "task": spec}
    with tracked_run(config, "normalise", {"task": task}, params=params) as run:
        start = time.perf_counter()
        raw_cases = read_raw_cases(raw)
        entries: list[dict[str, Any]] = []
        with atomic_output(out, directory=True) as tmp:
            for rc in tqdm(raw_cases, desc=f"normalise {task}", unit="case"):
                if rc.label is None:
                    raise InputDataError(raw / "dataset.json", f"case '{rc.case}' has no label")
                data, affine = load_volume(rc.image)
                label, label_affine = load_volume(rc.label)
                check_same_grid(rc.image, data.shape, affine, rc.label, label.shape, label_affine)
                if label.ndim != 3:
                    raise InputDataError(rc.label, f"expected a 3D label map, got shape {label.shape}")
                check_labels(rc.label, label, spec["labels"])
                image = select_channels(data, [channel], rc.image)
                del data
                foreground = class_volumes_mm3(label, label_affine, spec["classes"])
                nearest = np.stack([label, (image[0] != 0).astype(np.float32)])
                nearest, _ = resample_to_spacing(nearest, label_affine, spacing, label=True)
                image, new_affine = resample_to_spacing(image, affine, spacing)
                if image.shape[1:] != nearest.shape[1:]:  # pragma: no cover - same grid, same output
                    raise InputDataError(rc.label, "label resampled to a different grid than the image")
                normalised = _normalise_task_image(
                    spec["normalisation"], image[0], nearest[1] > 0.5, rc.image
                )
                image_rel, label_rel = f"images/{rc.case}.nii.gz", f"labels/{rc.case}.nii.gz"
                save_volume(tmp / image_rel, normalised, new_affine)
                save_volume(tmp / label_rel, np.rint(nearest[0]), new_affine, dtype=np.uint8)
                entries.append(
                    {
                        "case": rc.case,
                        "channel": channel,
                        "image": image_rel,
                        "label": label_rel,
                        "shape": [int(s) for s in normalised.shape],
                        "foreground_mm3": foreground,
                    }
                )
            write_json(tmp / MANIFEST, _manifest("task", dataset, task, modality, spacing, entries))
        seconds = time.perf_counter() - start
        run.metrics({"n_cases": len(raw_cases), "seconds": seconds})
    log.info("normalised %d cases of task %s in %.1f s", len(entries), task, seconds)
