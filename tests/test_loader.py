"""Pre-training loader: memory-mapped shards, balanced batches, per-epoch reproducibility, ranks, workers."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sar3d.data.loader import (
    BalancedBatchSampler,
    PretrainBatches,
    batch_generator,
    make_pretrain_loader,
    open_cube_store,
)
from sar3d.pretraining.transforms.genesis import GenesisConfig, GenesisTransform

SIZE = (4, 4, 2)


def cube_folder(root: Path, dataset: str, modality: int, n: int, offset: int) -> Path:
    """A cube shard whose cube k is filled with ``offset + k`` so every read can be checked."""
    root.mkdir(parents=True)
    cubes = np.lib.format.open_memmap(root / "cubes.npy", mode="w+", dtype=np.float32, shape=(n, *SIZE))
    cubes[:] = (offset + np.arange(n, dtype=np.float32))[:, None, None, None]
    del cubes
    scale = np.tile([0, 1, 2, 2], n // 4)
    split = np.where(np.arange(n) < n * 3 // 4, "train", "val")
    meta = pd.DataFrame({
        "index": np.arange(n), "case": [f"{dataset}{k // 8}" for k in range(n)], "channel": 0,
        "scale": scale, "scale_fraction": np.array([0.5, 0.25, 0.125])[scale], "modality": modality,
        "split": split, "origin_x": 0, "origin_y": 0, "origin_z": 0, "size_x": 8, "size_y": 8, "size_z": 4,
    })
    meta.to_csv(root / "meta.csv", index=False)
    manifest = {"dataset": dataset, "modality": ["CT", "MRI"][modality], "n_cubes": n, "size": list(SIZE),
                "scales": [0.5, 0.25, 0.125], "ratio": [1, 1, 2], "excluded_cases": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    return [cube_folder(root / "ct", "ct", 0, 64, 0), cube_folder(root / "mri", "mri", 1, 96, 1000)]


def cube_id(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["cube"][:, 0, 0, 0, 0].long().tolist()


def test_store_is_memory_mapped_and_reads_the_right_rows(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    assert all(isinstance(a, np.memmap) for a in store.arrays)
    assert len(store) == 48 + 72
    batch = store.fetch([0, 47, 48, 5, 119])
    assert batch["cube"].shape == (5, 1, *SIZE) and batch["cube"].dtype == torch.float32
    assert cube_id(batch) == [0, 47, 1000, 5, 1071]
    assert batch["modality"].tolist() == [0, 0, 1, 0, 1] and batch["modality"].dtype == torch.int64
    assert batch["scale"].tolist() == [0, 2, 0, 1, 2] and batch["scale"].dtype == torch.int64
    assert len(pickle.dumps(store)) < 0.5 * sum(a.nbytes for a in store.arrays)  # workers get no data copy
    val = open_cube_store(dirs, "val")
    assert set(cube_id(val.fetch(range(len(val))))) == set(range(48, 64)) | set(range(1072, 1096))
    small = open_cube_store(dirs, "all", scales=[2])
    assert len(small) == 80 and set(small.scale.tolist()) == {2}


def test_batches_keep_modalities_and_scale_ratio(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    sampler = BalancedBatchSampler(store, batch_size=8, seed=3, epoch=0, steps=20)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for indices in batches:
        assert len(indices) == 8
        assert Counter(store.modality[indices].tolist()) == {0: 4, 1: 4}
        for m in (0, 1):
            in_m = indices[store.modality[indices] == m]
            assert Counter(store.scale[in_m].tolist()) == {0: 1, 1: 1, 2: 2}
    drawn = np.concatenate(batches)
    ct_small = np.flatnonzero((store.modality == 0) & (store.scale == 2))
    assert set(ct_small) <= set(drawn)  # 40 CT small draws cover all 24 CT small cubes


def test_small_and_odd_batches_stay_balanced_on_average(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    batches = list(BalancedBatchSampler(store, batch_size=3, seed=3, epoch=0, steps=400))
    per_batch = [Counter(store.modality[b].tolist()) for b in batches]
    assert all(set(c) == {0, 1} for c in per_batch)
    scales = Counter(store.scale[np.concatenate(batches)].tolist())
    assert scales[2] / sum(scales.values()) == pytest.approx(0.5, abs=0.05)
    assert scales[0] / sum(scales.values()) == pytest.approx(0.25, abs=0.05)
    mri_only = open_cube_store(dirs[1:], "train")
    for batch in BalancedBatchSampler(mri_only, batch_size=4, seed=0, epoch=0, steps=5):
        assert Counter(mri_only.scale[batch].tolist()) == {0: 1, 1: 1, 2: 2}


def test_reproducible_per_epoch_and_different_across_epochs(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")

    def epoch_ids(seed: int, epoch: int) -> list[list[int]]:
        loader = make_pretrain_loader(store, batch_size=8, seed=seed, epoch=epoch, steps=5)
        return [cube_id(batch) for batch in loader]

    first = epoch_ids(1, 0)
    assert first == epoch_ids(1, 0)
    assert first != epoch_ids(1, 1)
    assert first != epoch_ids(2, 0)


def test_loader_yields_dict_batches_with_workers(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    loader = make_pretrain_loader(store, batch_size=6, seed=1, epoch=0, steps=3, num_workers=1)
    assert loader.pin_memory == torch.cuda.is_available()
    in_process = [cube_id(b) for b in make_pretrain_loader(store, batch_size=6, seed=1, epoch=0, steps=3)]
    batches = list(loader)
    assert [cube_id(b) for b in batches] == in_process
    for batch in batches:
        assert set(batch) == {"cube", "scale", "modality"}
        assert batch["cube"].shape == (6, 1, *SIZE)


def test_ranks_draw_different_batches_that_tile_the_single_process_epoch(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    whole = [cube_id(b) for b in make_pretrain_loader(store, batch_size=8, seed=1, epoch=0, steps=6)]
    ranks = [[cube_id(b) for b in make_pretrain_loader(store, batch_size=8, seed=1, epoch=0, steps=3,
                                                       rank=r, world_size=2)] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and ranks[0] != ranks[1]
    assert [b for pair in zip(*ranks, strict=True) for b in pair] == whole  # rank r takes batches r, r+2, ...
    with pytest.raises(ValueError, match="rank"):
        PretrainBatches(store, 8, 1, 0, 3, rank=2, world_size=2)


def test_corruption_in_workers_is_seeded_per_batch_not_per_worker(dirs: list[Path]) -> None:
    store = open_cube_store(dirs, "train")
    transform = GenesisTransform(GenesisConfig(local_shuffle_windows=20, local_shuffle_max_window=(2, 2, 1)))

    def views(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The Genesis method's views: the corrupted cube and its (flipped) target."""
        x_hat, target = transform(batch.pop("cube"), generator)
        return {"x_hat": x_hat, "target": target, **batch}

    def epoch(epoch: int, workers: int) -> list[dict[str, torch.Tensor]]:
        return list(make_pretrain_loader(store, 6, seed=1, epoch=epoch, steps=4, num_workers=workers,
                                         views=views, views_seed=7))

    in_process, in_workers = epoch(0, 0), epoch(0, 2)
    for a, b in zip(in_process, in_workers, strict=True):
        assert set(a) == set(b) == {"x_hat", "target", "scale", "modality"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    # batch 2 of epoch 0 is exactly the transform under that batch's own generator
    raw = list(make_pretrain_loader(store, 6, seed=1, epoch=0, steps=4))[2]["cube"]
    x_hat, target = transform(raw, batch_generator(7, 0, 2))
    assert torch.equal(in_process[2]["x_hat"], x_hat) and torch.equal(in_process[2]["target"], target)
    assert not torch.equal(x_hat, target)
    assert not torch.equal(epoch(1, 0)[2]["x_hat"], x_hat)
