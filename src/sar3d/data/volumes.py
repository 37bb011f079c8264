"""The pre-training data path of methods that read whole normalised volumes instead of cube shards.

A volume method (``input = VOLUMES``, e.g. one that crops at a random scale)
trains on the very cases the cube methods train on: a volume's split (train |
val) is its case's split in the cube shard of the same dataset (``meta.csv``),
and cases the shard excluded (held-out test cases of a task) are never read.
Volumes are loaded once and kept in memory (a 2 mm phantom volume is a few MB).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sar3d.data.cubes import MODALITY_CODE
from sar3d.io import InputDataError, load_volume, read_json
from sar3d.paths import MANIFEST
from sar3d.seeding import numpy_rng

SPLITS = ("train", "val", "all")


def _case_splits(cube_dirs: Sequence[Path]) -> dict[str, dict[str, str]]:
    """Dataset -> (case -> split) from the cube shards' manifests and ``meta.csv``."""
    out: dict[str, dict[str, str]] = {}
    for folder in map(Path, cube_dirs):
        dataset = read_json(folder / MANIFEST)["dataset"]
        meta = pd.read_csv(folder / "meta.csv", usecols=["case", "split"]).drop_duplicates("case")
        out[dataset] = dict(zip(meta["case"].astype(str), meta["split"], strict=True))
    return out


class VolumeStore:
    """The normalised volumes (one per case and channel) of one split, with their modality codes.

    Args:
        volume_dirs: ``preprocessed/pretrain/<dataset>`` folders (``sar3d normalise --dataset``).
        cube_dirs: the cube shards of the same datasets; they fix each case's split.
        split: ``train``, ``val`` or ``all``.
    """

    def __init__(self, volume_dirs: Sequence[Path], cube_dirs: Sequence[Path], split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        splits = _case_splits(cube_dirs)
        self.split = split
        self.entries: list[tuple[Path, str, int]] = []
        for folder in map(Path, volume_dirs):
            manifest = read_json(folder / MANIFEST)
            dataset = manifest["dataset"]
            if dataset not in splits:
                raise InputDataError(folder / MANIFEST, f"no cube shard of dataset '{dataset}' gives its case split")
            modality = MODALITY_CODE[manifest["modality"]]
            for entry in manifest["cases"]:
                where = splits[dataset].get(str(entry["case"]))
                if where is not None and split in ("all", where):
                    self.entries.append((folder / entry["image"], str(entry["case"]), modality))
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def volume(self, index: int) -> torch.Tensor:
        """Volume ``index`` as float32 ``(1, X, Y, Z)`` in [0, 1], read on first use."""
        if index not in self._cache:
            array, _ = load_volume(self.entries[index][0])
            self._cache[index] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        return self._cache[index]

    def fetch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """One batch: ``volumes`` (list of ``(1, X, Y, Z)``, shapes differ), ``modality`` int64 (B,), ``case``."""
        indices = [int(i) for i in indices]
        return {
            "volumes": [self.volume(i) for i in indices],
            "modality": torch.tensor([self.entries[i][2] for i in indices], dtype=torch.int64),
            "case": [self.entries[i][1] for i in indices],
        }


def uniform_batches(store: VolumeStore, batch_size: int, seed: int, epoch: int, steps: int) -> Iterator[np.ndarray]:
    """``steps`` batches of volume indices drawn uniformly with replacement, seeded by (seed, epoch).

    The sampler of :func:`sar3d.data.loader.make_pretrain_loader` for a :class:`VolumeStore`.
    """
    if len(store) == 0:
        raise ValueError(f"no volumes in the '{store.split}' selection")
    rng = numpy_rng(seed, "volume-batches", epoch)
    for _ in range(steps):
        yield rng.integers(0, len(store), size=batch_size)
