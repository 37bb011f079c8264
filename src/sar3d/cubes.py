"""Multi-scale cube generator (paper section 2.2, Fig. 2, Table 1).

From every pre-training volume, crops of about 1/2, 1/4 and 1/8 of the volume
side are cut at random positions in the ratio 1:1:2 (small crops are more
diverse), then all are resized to one input size (64x64x32). The scale index is
the label of the scale-aware module.

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
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize
from numpy.lib.format import open_memmap
from tqdm import tqdm

from sar3d.io import InputDataError, atomic_output, load_volume, read_json, write_json
from sar3d.paths import MANIFEST
from sar3d.seeding import numpy_rng
from sar3d.splits import round_half_up
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


def crop_size(shape: Sequence[int], scale: float) -> tuple[int, int, int]:
    """Crop side per axis: ``round(scale * side)``, at least 2 voxels, at most the side."""
    return tuple(min(int(s), max(2, round_half_up(scale * s))) for s in shape)


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


def cut_cubes(
    volume: np.ndarray, counts: Sequence[int], scales: Sequence[float], out_size: Sequence[int],
    min_foreground: float, rng: np.random.Generator,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray, tuple[int, int, int]]]]:
    """All cubes of one volume: ``(cubes (N, *out_size), [(scale index, origin, size), ...])``.

    Crops of one scale share their size, so they are resized together in one
    MONAI ``Resize`` call (the crops stacked along the channel axis).
    """
    table = _summed_area(volume > BACKGROUND_LEVEL)
    resize = Resize(spatial_size=tuple(out_size), mode="trilinear", anti_aliasing=False)
    cubes: list[np.ndarray] = []
    records: list[tuple[int, np.ndarray, tuple[int, int, int]]] = []
    for s, (scale, count) in enumerate(zip(scales, counts, strict=True)):
        if count == 0:
            continue
        size = crop_size(volume.shape, scale)
        origins = choose_origins(table, volume.shape, size, count, min_foreground, rng)
        crops = np.stack(
            [volume[o[0] : o[0] + size[0], o[1] : o[1] + size[1], o[2] : o[2] + size[2]] for o in origins]
        )
        resized = resize(torch.from_numpy(crops))
        cubes.append(np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0))
        records.extend((s, origin, size) for origin in origins)
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
    counts = apportion(spec["per_volume"], spec["ratio"])
    scales = [float(s) for s in spec["scales"]]
    size = [int(s) for s in spec["size"]]
    n_cubes = len(volumes) * spec["per_volume"]
    params = {"cubes": spec, "n_heldout_files": len(heldout)}
    with tracked_run(config, "cubes", {"dataset": dataset}, params=params) as run:
        start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        with atomic_output(out, directory=True) as tmp:
            store = open_memmap(tmp / "cubes.npy", mode="w+", dtype=np.float32, shape=(n_cubes, *size))
            cursor = 0
            for entry in tqdm(volumes, desc=f"cubes {dataset}", unit="volume"):
                path = data / entry["image"]
                volume, _ = load_volume(path)
                if volume.ndim != 3 or volume.min() < -1e-4 or volume.max() > 1 + 1e-4:
                    raise InputDataError(path, "expected a 3D pre-training volume with values in [0, 1]")
                rng = numpy_rng(seed, "cubes", dataset, entry["case"], entry["channel"])
                cubes, records = cut_cubes(volume, counts, scales, size, spec["min_foreground"], rng)
                store[cursor : cursor + len(cubes)] = cubes
                for s, origin, crop in records:
                    rows.append(
                        {
                            "index": cursor, "case": entry["case"], "channel": entry["channel"],
                            "scale": s, "scale_fraction": scales[s], "modality": MODALITY_CODE[modality],
                            "split": split_of[entry["case"]],
                            **{f"origin_{a}": int(o) for a, o in zip("xyz", origin, strict=True)},
                            **{f"size_{a}": int(c) for a, c in zip("xyz", crop, strict=True)},
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
                    "dataset": dataset, "modality": modality, "n_cubes": n_cubes, "size": size,
                    "scales": scales, "ratio": list(spec["ratio"]), "excluded_cases": excluded,
                },
            )
        metrics: dict[str, float] = {
            "n_cubes": n_cubes, "n_volumes": len(volumes), "n_excluded_cases": len(excluded),
            "n_train_cases": sum(v == "train" for v in split_of.values()),
            "n_val_cases": sum(v == "val" for v in split_of.values()),
            "seconds": time.perf_counter() - start,
        }
        for (s, split), n in meta.groupby(["scale", "split"]).size().items():
            metrics[f"n_cubes_scale{s}_{split}"] = int(n)
        run.metrics(metrics)
    log.info("cut %d cubes from %d volumes of %s", n_cubes, len(volumes), dataset)
