"""The pre-training data path: memory-mapped cube shards -> balanced batches.

Cube shards (``cubes/{dataset}/cubes.npy``) are memory-mapped, never read whole:
~100,000 cubes of 64x64x32 float32 are 52 GB, so a batch reads only its own
rows. The sampler builds every batch with both modalities (half CT, half MRI,
for the modality discriminator) and the scales in the configured ratio (1:1:2
for the scale-aware module), seeded by (seed, epoch) so a run is reproducible
and each epoch draws differently.

This module is the seam for data-loading performance work: the store, the
sampler and the loader are separate so any can be replaced on its own. The
loader can also run the Models Genesis corruption in its workers
(``pretrain.transform_device: cpu``), so the trainer only waits for batches
that are ready to train on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sar3d.io import InputDataError, read_json
from sar3d.paths import MANIFEST
from sar3d.seeding import numpy_rng, torch_generator

SPLITS = ("train", "val", "all")


class CubeStore(Dataset):
    """Selected cubes of one or more shards, addressed by one global index.

    The memory maps are opened lazily and dropped when pickled, so DataLoader
    workers each open their own map instead of receiving a copy of the data.
    """

    def __init__(self, dirs: Sequence[Path], split: str, scales: Sequence[int] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        self.dirs = [Path(d) for d in dirs]
        if not self.dirs:
            raise ValueError("no cube folders given")
        shard, row, scale, modality = [], [], [], []
        ratio: dict[int, float] = {}
        size = None
        for k, folder in enumerate(self.dirs):
            manifest = read_json(folder / MANIFEST)
            meta = pd.read_csv(folder / "meta.csv")
            if len(meta) != manifest["n_cubes"] or not np.array_equal(meta["index"], np.arange(len(meta))):
                raise InputDataError(folder / "meta.csv", f"does not describe the {manifest['n_cubes']} cubes")
            if size is not None and list(manifest["size"]) != size:
                raise InputDataError(folder / MANIFEST, f"cube size {manifest['size']} differs from {size}")
            size = list(manifest["size"])
            for s, weight in enumerate(manifest["ratio"]):
                if ratio.setdefault(s, float(weight)) != float(weight):
                    raise InputDataError(folder / MANIFEST, "scale ratio differs from the other cube folders")
            keep = np.ones(len(meta), dtype=bool)
            if split != "all":
                keep &= (meta["split"] == split).to_numpy()
            if scales is not None:
                keep &= meta["scale"].isin(list(scales)).to_numpy()
            rows = meta.loc[keep]
            shard.append(np.full(len(rows), k, dtype=np.int64))
            row.append(rows["index"].to_numpy(np.int64))
            scale.append(rows["scale"].to_numpy(np.int64))
            modality.append(rows["modality"].to_numpy(np.int64))
        self.split = split
        self.size = tuple(size or ())
        self.ratio = ratio
        self.shard = np.concatenate(shard)
        self.row = np.concatenate(row)
        self.scale = np.concatenate(scale)
        self.modality = np.concatenate(modality)
        self._arrays: list[np.ndarray] | None = None
        self.arrays  # noqa: B018 - open now so a bad shard fails here, not in a worker

    @property
    def arrays(self) -> list[np.ndarray]:
        """The memory-mapped ``cubes.npy`` of every shard (opened on first use in each process)."""
        if self._arrays is None:
            arrays = []
            for folder in self.dirs:
                path = folder / "cubes.npy"
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as err:
                    raise InputDataError(path, f"cannot memory-map ({err})") from err
                if array.dtype != np.float32 or array.shape[1:] != self.size:
                    raise InputDataError(path, f"expected float32 (N, {self.size}), got {array.dtype} {array.shape}")
                arrays.append(array)
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.fetch([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.fetch(indices)

    def fetch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """One batch: ``cube`` float32 (B, 1, X, Y, Z), ``scale`` and ``modality`` int64 (B,).

        Rows are read shard by shard in ascending order, so a batch costs a few
        sequential-ish reads of the memory map, not a copy of the shard.
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.size), dtype=np.float32)
        arrays = self.arrays
        for k in np.unique(self.shard[indices]):
            where = np.flatnonzero(self.shard[indices] == k)
            rows = self.row[indices[where]]
            order = np.argsort(rows, kind="stable")
            out[where[order]] = arrays[k][rows[order]]
        return {
            "cube": torch.from_numpy(out).unsqueeze(1),
            "scale": torch.from_numpy(self.scale[indices].copy()),
            "modality": torch.from_numpy(self.modality[indices].copy()),
        }


def open_cube_store(dirs: Sequence[Path], split: str, scales: Sequence[int] | None = None) -> CubeStore:
    """Memory-map the cubes of ``split`` ('train' | 'val' | 'all'), optionally only some scale indices."""
    return CubeStore(dirs, split, scales)


def _share(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer shares of ``total`` closest to ``weights``; leftover slots drawn by remainder.

    Drawing the leftovers (rather than always giving them to the same group)
    keeps the ratio right on average even when a batch is too small to hold it.
    """
    quota = total * weights / weights.sum()
    counts = np.floor(quota + 1e-9).astype(np.int64)
    left = int(total - counts.sum())
    if left:
        remainder = np.clip(quota - counts, 0, None)
        p = remainder / remainder.sum() if remainder.sum() > 0 else weights / weights.sum()
        counts[rng.choice(len(weights), size=left, replace=False, p=p)] += 1
    return counts


class BalancedBatchSampler(Sampler[np.ndarray]):
    """``steps`` batches of store indices with both modalities and the scale ratio in each.

    Within every (modality, scale) group cubes are drawn without replacement
    until the group is used up, then reshuffled, so an epoch covers a group
    evenly before repeating.
    """

    def __init__(self, store: CubeStore, batch_size: int, seed: int, epoch: int, steps: int) -> None:
        if len(store) == 0:
            raise ValueError(f"no cubes in the '{store.split}' selection")
        if batch_size < 1 or steps < 1:
            raise ValueError("batch_size and steps must be positive")
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.steps = steps
        self.modalities = sorted(np.unique(store.modality).tolist())
        self.groups: dict[int, dict[int, np.ndarray]] = {}
        for m in self.modalities:
            in_m = store.modality == m
            self.groups[m] = {int(s): np.flatnonzero(in_m & (store.scale == s)) for s in np.unique(store.scale[in_m])}

    def __len__(self) -> int:
        return self.steps

    def _scale_weights(self, scales: list[int]) -> np.ndarray:
        weights = np.array([self.store.ratio.get(s, 1.0) for s in scales], dtype=np.float64)
        return weights if weights.sum() > 0 else np.ones(len(scales))

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = numpy_rng(self.seed, "cube-batches", self.epoch)
        pools: dict[tuple[int, int], list[int]] = {}

        def take(m: int, s: int, n: int) -> list[int]:
            pool = pools.setdefault((m, s), [])
            picked: list[int] = []
            while len(picked) < n:
                if not pool:
                    pool.extend(rng.permutation(self.groups[m][s]).tolist())
                picked.append(pool.pop())
            return picked

        for _ in range(self.steps):
            per_modality = _share(self.batch_size, np.ones(len(self.modalities)), rng)
            batch: list[int] = []
            for m, n_m in zip(self.modalities, per_modality, strict=True):
                scales = sorted(self.groups[m])
                for s, n_s in zip(scales, _share(int(n_m), self._scale_weights(scales), rng), strict=True):
                    batch.extend(take(m, s, int(n_s)))
            yield rng.permutation(np.asarray(batch, dtype=np.int64))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a worker from its torch seed (itself from the loader's generator)."""
    from sar3d.training.devices import keep_freed_memory

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    keep_freed_memory()  # workers corrupt whole batches: same large-temporary pattern as the trainer


def _whole_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The store already returns the batch dict; nothing to collate."""
    return batch


# a method's view maker: raw batch and a seeded generator -> the batch its step trains on
Views = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
# index batches of one epoch: (store, batch_size, seed, epoch, n_batches) -> one index array per batch
Sampler_ = Callable[[Any, int, int, int, int], Iterable[np.ndarray]]


def batch_generator(
    views_seed: int, epoch: int, global_step: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The view generator of one batch: the same wherever (worker, main process, GPU) it is drawn."""
    return torch_generator(views_seed, "corrupt", epoch, global_step, device=device)  # key kept: same numbers as before


class PretrainBatches(Dataset):
    """The batches of one epoch on one rank, item ``step`` = one whole batch, optionally made into views.

    Batch indices come from one ``sampler`` (by default :class:`BalancedBatchSampler`)
    over ``steps * world_size`` batches, of which rank ``r`` takes every
    ``world_size``-th starting at ``r``: ranks draw different samples, and the
    epoch's samples do not depend on which rank reads them. With ``views`` (a
    method's view maker, e.g. the Genesis corruption) the batch is made into its
    views where it is read (in a DataLoader worker when there are workers), with a
    generator seeded by (``views_seed``, epoch, global batch number), so the result
    is the same for any number of workers and after a resume.
    """

    def __init__(
        self, store: Any, batch_size: int, seed: int, epoch: int, steps: int, *,
        rank: int = 0, world_size: int = 1, views: Views | None = None, views_seed: int = 0,
        sampler: Sampler_ | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        batches = (sampler or BalancedBatchSampler)(store, batch_size, seed, epoch, steps * world_size)
        self.store = store
        self.batches = list(batches)[rank::world_size]
        self.global_step = list(range(rank, steps * world_size, world_size))
        self.epoch = epoch
        self.views = views
        self.views_seed = views_seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        batch = self.store.fetch(self.batches[step])
        if self.views is None:
            return batch
        return self.views(batch, batch_generator(self.views_seed, self.epoch, self.global_step[step]))


def make_pretrain_loader(
    store: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    steps: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    views: Views | None = None,
    views_seed: int = 0,
    sampler: Sampler_ | None = None,
) -> DataLoader:
    """A DataLoader yielding ``steps`` batches (dicts) of one epoch for one rank.

    Without ``views`` a cube batch is ``{"cube", "scale", "modality"}`` (balanced by
    :class:`BalancedBatchSampler`); with them, what ``views`` makes of it (see
    :class:`PretrainBatches`). ``store`` and ``sampler`` may be any pair with a
    ``fetch(indices)`` (e.g. :mod:`sar3d.data.volumes`).
    ``pin_memory`` defaults to CUDA being available (page-locked host memory makes
    the host-to-GPU copy asynchronous); on CPU it is off.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    batches = PretrainBatches(store, batch_size, seed, epoch, steps, rank=rank, world_size=world_size,
                              views=views, views_seed=views_seed, sampler=sampler)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra.update(worker_init_fn=_seed_worker, prefetch_factor=2, persistent_workers=False)
    return DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        collate_fn=_whole_batch,
        num_workers=num_workers,
        pin_memory=bool(pin_memory),
        generator=torch_generator(seed, "cube-loader", epoch),
        **extra,
    )


__all__ = [
    "BalancedBatchSampler", "CubeStore", "PretrainBatches", "batch_generator", "make_pretrain_loader",
    "open_cube_store",
]
