"""Multi-scale cube generator (paper section 2.2, Fig. 2, Table 1).

From every pre-training volume, crops of about 1/2, 1/4 and 1/8 of the
volume's smaller in-plane side are cut at random positions in the ratio 1:1:2
(small crops are more diverse), then all are resized to one input size
(64x64x32). A crop's label for the scale-aware module is the position of its
fraction in ``cubes.scales`` (:func:`sar3d.data.scales.scale_index`), so reordering the scales
reorders the labels with them.

Geometry (docs/deviations.md): every crop has the *physical* aspect of the
input size (2:2:1 for 64x64x32), so resizing scales every axis by the same
factor (to voxel rounding) instead of squashing anatomy; its in-plane side is
the scale times the volume's smaller in-plane extent (mm). A volume too thin
for that box gets the largest box of the same aspect that fits (all sides
shrunk by one factor), counted per scale as ``n_clamped_scale{s}``. Crops
larger than the input size are downsampled by area averaging (anti-aliased,
no zero-padded filter darkening the borders); smaller ones are upsampled
trilinearly.

Cases that are a test case of any downstream task on the same dataset are
excluded first, so no test image is ever exposed to pre-training; pre-training
cases are split train/validation *by case* so validation cubes come from unseen
volumes. Cubes are streamed into one memory-mapped ``cubes.npy`` so memory stays
bounded by one volume however many cubes are cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize
from numpy.lib.format import open_memmap
from tqdm import tqdm

from sar3d.data.splits import round_half_up
from sar3d.io import InputDataError, atomic_output, load_volume, read_json, voxel_spacing, write_json
from sar3d.paths import MANIFEST
from sar3d.seeding import numpy_rng
from sar3d.tracking import tracked_run

log = logging.getLogger(__name__)

MODALITY_CODE = {"CT": 0, "MRI": 1}
# Intensity above which a [0, 1]-scaled voxel counts as non-background (air, outside the head).
BACKGROUND_LEVEL = 0.01
MAX_TRIES = 32
META_COLUMNS = [
    "index", "case", "channel", "scale", "scale_fraction", "modality", "split",
    "origin_x", "origin_y", "origin_z", "size_x", "size_y", "size_z",
]


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties to the first)."""
    weights = np.asarray(weights, dtype=np.float64)
    if total < 0 or weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(f"cannot apportion {total} over weights {weights.tolist()}")
    quota = total * weights / weights.sum()
    counts = np.floor(quota + 1e-9).astype(int)
    remainder = quota - counts
    order = sorted(range(len(weights)), key=lambda i: (-round(remainder[i], 9), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def cubes_per_volume(spec: Mapping[str, Any], dataset: str) -> int:
    """Cubes cut from each volume of ``dataset``: its ``per_volume_by_dataset`` entry, else ``per_volume``."""
    return int(spec.get("per_volume_by_dataset", {}).get(dataset, spec["per_volume"]))


def crop_extent_mm(
    shape: Sequence[int], spacing: Sequence[float], scale: float, out_size: Sequence[int]
) -> tuple[np.ndarray, bool]:
    """Physical crop size (mm per axis) at ``scale``, and whether it had to shrink to fit.

    The crop has the aspect of ``out_size`` (2:2:1 for 64x64x32); its largest
    in-plane side is ``scale`` times the volume's smaller in-plane extent. When
    that box does not fit (a thin volume), every side shrinks by the same factor
    until it does, which keeps the aspect and gives up the exact scale.
    """
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    aspect = np.asarray(out_size, dtype=np.float64) / max(out_size[0], out_size[1])
    box = scale * min(extent[0], extent[1]) * aspect
    fit = float(np.min(extent / box))
    return (box * fit, True) if fit < 1.0 - 1e-9 else (box, False)


def crop_size(
    shape: Sequence[int], spacing: Sequence[float], scale: float, out_size: Sequence[int]
) -> tuple[tuple[int, int, int], bool]:
    """Crop size in voxels (the mm box of :func:`crop_extent_mm` rounded, 2 to the side) and the clamp flag."""
    extent, clamped = crop_extent_mm(shape, spacing, scale, out_size)
    voxels = tuple(
        min(int(n), max(2, round_half_up(mm / float(s)))) for n, mm, s in zip(shape, extent, spacing, strict=True)
    )
    return voxels, clamped  # type: ignore[return-value]


def resize_crops(crops: np.ndarray, out_size: Sequence[int]) -> np.ndarray:
    """Resize crops ``(N, X, Y, Z)`` of one size to ``(N, *out_size)``, anti-aliased where they shrink.

    Axes that shrink are area-averaged first (MONAI ``Resize`` mode ``area``, an
    exact box filter with no padding), axes that grow are then interpolated
    trilinearly. MONAI's Gaussian ``anti_aliasing`` is not used: it zero-pads,
    which darkens the borders of downsampled crops only (measured: a constant
    crop came out 0.80-0.93 at its faces), a cue that would give the scale away.
    """
    out = tuple(int(s) for s in out_size)
    tensor = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    shrunk = tuple(min(n, o) for n, o in zip(tensor.shape[1:], out, strict=True))
    if shrunk != tuple(tensor.shape[1:]):
        tensor = torch.as_tensor(Resize(spatial_size=shrunk, mode="area")(tensor))
    if shrunk != out:
        tensor = torch.as_tensor(Resize(spatial_size=out, mode="trilinear", anti_aliasing=False)(tensor))
    return np.clip(tensor.numpy().astype(np.float32, copy=False), 0.0, 1.0)


def _summed_area(mask: np.ndarray) -> np.ndarray:
    """Zero-padded 3D summed-area table, so any box's foreground count costs 8 lookups."""
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=dtype)
    table[1:, 1:, 1:] = mask.cumsum(0, dtype=dtype).cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    return table


def _box_fractions(table: np.ndarray, origins: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Foreground fraction of boxes at ``origins`` (K, 3) of one ``size``, vectorised."""
    lo = origins
    hi = origins + np.asarray(size)
    total = np.zeros(len(origins), dtype=np.float64)
    for corner in range(8):
        pick = [(corner >> axis) & 1 for axis in range(3)]
        idx = tuple(np.where(pick[a], hi[:, a], lo[:, a]) for a in range(3))
        sign = -1 if (3 - sum(pick)) % 2 else 1
        total += sign * table[idx]
    return total / float(np.prod(size))


def choose_origins(
    table: np.ndarray, shape: Sequence[int], size: Sequence[int], n: int, min_foreground: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` random crop origins, each re-drawn up to MAX_TRIES times to reach ``min_foreground``.

    A crop that never reaches it takes its best candidate, so a mostly empty
    volume still yields its cubes instead of looping forever.
    """
    high = np.asarray(shape) - np.asarray(size) + 1
    origins = np.empty((n, 3), dtype=np.int64)
    for i in range(n):
        candidates = rng.integers(0, high, size=(MAX_TRIES, 3))
        fractions = _box_fractions(table, candidates, size)
        good = np.flatnonzero(fractions >= min_foreground)
        origins[i] = candidates[good[0] if good.size else int(np.argmax(fractions))]
    return origins


class Crop(NamedTuple):
    """Where one cube came from: scale label, origin and size (voxels), and whether its box was clamped."""

    scale: int
    origin: np.ndarray
    size: tuple[int, int, int]
    clamped: bool


def cut_cubes(
    volume: np.ndarray, spacing: Sequence[float], counts: Sequence[int], scales: Sequence[float],
    out_size: Sequence[int], min_foreground: float, rng: np.random.Generator,
) -> tuple[np.ndarray, list[Crop]]:
    """All cubes of one volume: ``(cubes (N, *out_size), one Crop per cube)``.

    ``counts[s]`` crops are cut at ``scales[s]`` and labelled ``s``. Crops of one
    scale share their size, so they are resized together.
    """
    table = _summed_area(volume > BACKGROUND_LEVEL)
    cubes: list[np.ndarray] = []
    records: list[Crop] = []
    for s, (scale, count) in enumerate(zip(scales, counts, strict=True)):
        if count == 0:
            continue
        size, clamped = crop_size(volume.shape, spacing, scale, out_size)
        origins = choose_origins(table, volume.shape, size, count, min_foreground, rng)
        crops = np.stack(
            [volume[o[0] : o[0] + size[0], o[1] : o[1] + size[1], o[2] : o[2] + size[2]] for o in origins]
        )
        cubes.append(resize_crops(crops, out_size))
        records.extend(Crop(s, origin, size, clamped) for origin in origins)
    return np.concatenate(cubes), records


def excluded_cases(dataset: str, heldout: Sequence[Path]) -> list[str]:
    """Every case of ``dataset`` that is a test case of some downstream task."""
    out: set[str] = set()
    for path in heldout:
        spec = read_json(path)
        if not isinstance(spec, dict) or "dataset" not in spec or "cases" not in spec:
            raise InputDataError(path, "held-out file needs 'dataset' and 'cases'")
        if spec["dataset"] == dataset:
            out.update(str(c) for c in spec["cases"])
    return sorted(out)


def split_cases(cases: Sequence[str], val_fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """Case -> 'train' | 'val'; at least one validation case whenever there are two cases."""
    cases = sorted(set(cases))
    n_val = 0
    if len(cases) >= 2:
        n_val = min(max(1, round_half_up(val_fraction * len(cases))), len(cases) - 1)
    order = [cases[i] for i in rng.permutation(len(cases))]
    return {case: ("val" if i < n_val else "train") for i, case in enumerate(order)}


def run_cubes(config: Mapping[str, Any], dataset: str, data: Path, heldout: list[Path], out: Path) -> None:
    """Cut the multi-scale cubes of one pre-training dataset into ``out`` (cubes.npy, meta.csv, manifest)."""
    data, out = Path(data), Path(out)
    spec = config["cubes"]
    seed = config["seed"]
    manifest_path = data / MANIFEST
    manifest = read_json(manifest_path)
    if manifest.get("purpose") != "pretrain" or manifest.get("dataset") != dataset:
        raise InputDataError(manifest_path, f"not the pre-training manifest of dataset '{dataset}'")
    modality = manifest["modality"]
    excluded = excluded_cases(dataset, [Path(p) for p in heldout])
    volumes = [entry for entry in manifest["cases"] if entry["case"] not in set(excluded)]
    kept_cases = sorted({entry["case"] for entry in volumes})
    if len(kept_cases) < 2:
        raise InputDataError(
            manifest_path,
            f"only {len(kept_cases)} case(s) left after excluding {len(excluded)} downstream test case(s); "
            "pre-training needs at least 2 (train and validation)",
        )
    split_of = split_cases(kept_cases, spec["val_fraction"], numpy_rng(seed, "cubes", dataset, "split"))
    per_volume = cubes_per_volume(spec, dataset)
    counts = apportion(per_volume, spec["ratio"])
    scales = [float(s) for s in spec["scales"]]
    size = [int(s) for s in spec["size"]]
    n_cubes = len(volumes) * per_volume
    params = {"cubes": spec, "n_heldout_files": len(heldout), "cubes_per_volume": per_volume}
    with tracked_run(config, "cubes", {"dataset": dataset}, params=params) as run:
        start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        clamped = np.zeros(len(scales), dtype=np.int64)
        with atomic_output(out, directory=True) as tmp:
            store = open_memmap(tmp / "cubes.npy", mode="w+", dtype=np.float32, shape=(n_cubes, *size))
            cursor = 0
            for entry in tqdm(volumes, desc=f"cubes {dataset}", unit="volume"):
                path = data / entry["image"]
                volume, affine = load_volume(path)
                if volume.ndim != 3 or volume.min() < -1e-4 or volume.max() > 1 + 1e-4:
                    raise InputDataError(path, "expected a 3D pre-training volume with values in [0, 1]")
                rng = numpy_rng(seed, "cubes", dataset, entry["case"], entry["channel"])
                cubes, crops = cut_cubes(
                    volume, voxel_spacing(affine), counts, scales, size, spec["min_foreground"], rng
                )
                store[cursor : cursor + len(cubes)] = cubes
                for crop in crops:
                    clamped[crop.scale] += crop.clamped
                    rows.append(
                        {
                            "index": cursor, "case": entry["case"], "channel": entry["channel"],
                            "scale": crop.scale, "scale_fraction": scales[crop.scale],
                            "modality": MODALITY_CODE[modality], "split": split_of[entry["case"]],
                            **{f"origin_{a}": int(o) for a, o in zip("xyz", crop.origin, strict=True)},
                            **{f"size_{a}": int(c) for a, c in zip("xyz", crop.size, strict=True)},
                        }
                    )
                    cursor += 1
            store.flush()
            del store
            meta = pd.DataFrame(rows, columns=META_COLUMNS)
            meta.to_csv(tmp / "meta.csv", index=False)
            write_json(
                tmp / MANIFEST,
                {
                    "dataset": dataset, "modality": modality, "n_cubes": n_cubes, "per_volume": per_volume,
                    "size": size, "scales": scales, "ratio": list(spec["ratio"]), "excluded_cases": excluded,
                },
            )
        metrics: dict[str, float] = {
            "n_cubes": n_cubes, "n_volumes": len(volumes), "n_excluded_cases": len(excluded),
            "n_train_cases": sum(v == "train" for v in split_of.values()),
            "n_val_cases": sum(v == "val" for v in split_of.values()),
            "seconds": time.perf_counter() - start,
        }
        for s, n in enumerate(clamped):
            metrics[f"n_clamped_scale{s}"] = int(n)
        for (s, split), n in meta.groupby(["scale", "split"]).size().items():
            metrics[f"n_cubes_scale{s}_{split}"] = int(n)
        run.metrics(metrics)
    if clamped.any():
        log.warning("%s: %d crop(s) shrunk to fit a thin volume (per scale: %s)", dataset, clamped.sum(),
                    clamped.tolist())
    log.info("cut %d cubes from %d volumes of %s", n_cubes, len(volumes), dataset)
