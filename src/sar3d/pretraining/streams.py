"""Where a pre-training method's batches come from: stores, seeded loaders, views, the copy to the device.

Views (a method's :meth:`~sar3d.pretraining.base.PretrainMethod.make_views`) are
made on the CPU where a batch is read (DataLoader workers when
``pretrain.num_workers > 0``) or on the training device after the copy
(``pretrain.transform_device``); both draw from the generator of
:func:`sar3d.data.loader.batch_generator`, so the numbers do not depend on where.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sar3d.data.loader import batch_generator, make_pretrain_loader, open_cube_store
from sar3d.data.volumes import VolumeStore, uniform_batches
from sar3d.pretraining.base import VOLUMES, Batch, PretrainJob, PretrainMethod
from sar3d.seeding import derive_seed
from sar3d.training.devices import to_device
from sar3d.training.distributed import Distributed

log = logging.getLogger(__name__)


def resolve_transform_device(name: str, device: torch.device) -> torch.device:
    """Where views are made: ``auto`` follows the training device; ``cuda`` needs a CUDA run."""
    if name == "auto":
        return torch.device(device.type)
    if name == "cuda" and device.type != "cuda":
        raise ValueError("pretrain.transform_device 'cuda' needs pretrain.device on CUDA")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown pretrain.transform_device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """Copy every tensor (and every tensor of a list) to ``device``."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return to_device(value, device)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [to_device(v, device) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


@dataclass
class Stores:
    """The training and validation stores of one job, and what validation runs on."""

    train: Any
    val: Any
    validation_on: str = "val"


def open_stores(method: PretrainMethod, job: PretrainJob) -> Stores:
    """Cube shards (filtered to the method's scales) or normalised volumes, per the method's ``input``."""
    if method.input == VOLUMES:
        train, val = (VolumeStore(job.volumes, job.data, split) for split in ("train", "val"))
    else:
        scales = method.cube_scales()
        train, val = (open_cube_store(list(job.data), split, scales) for split in ("train", "val"))
    if len(val) == 0:  # too few cases for a val split: score on fixed train batches instead
        log.warning("no validation data in %s; validating on fixed training batches", [str(d) for d in job.data])
        return Stores(train, train, "train (no val data)")
    return Stores(train, val)


@dataclass
class BatchSource:
    """Seeded epochs of one method's batches on this rank's device.

    Args:
        method: the method whose views are made.
        stores: its training and validation stores.
        device: the training device.
        views_in_loader: make views where batches are read (CPU) rather than on ``device``.
        dist: this process's place in a torchrun job.
        pin_memory: page-locked host batches (CUDA).
    """

    method: PretrainMethod
    stores: Stores
    device: torch.device
    views_in_loader: bool
    dist: Distributed
    pin_memory: bool = False

    def epoch(self, split: str, epoch: int, steps: int, workers: int) -> Iterator[Batch]:
        """``steps`` batches of ``split`` (validation: the same inputs every epoch when called with epoch 0)."""
        key = self.method.name if split == "train" else "val"
        seed = self.method.config["seed"]
        views_seed = derive_seed(seed, "pretrain", key, "corrupt")
        store = self.stores.train if split == "train" else self.stores.val
        loader = make_pretrain_loader(
            store, self.method.settings["batch_size"], derive_seed(seed, "pretrain", key, "batches"), epoch, steps,
            num_workers=workers, pin_memory=self.pin_memory, rank=self.dist.rank, world_size=self.dist.world_size,
            views=self.method.make_views if self.views_in_loader else None, views_seed=views_seed,
            sampler=uniform_batches if isinstance(store, VolumeStore) else None,
        )
        for step, batch in enumerate(loader):
            if not self.views_in_loader:
                generator = batch_generator(views_seed, epoch, step * self.dist.world_size + self.dist.rank,
                                            self.device)
                batch = self.method.make_views(move_batch(batch, self.device), generator)
            yield move_batch(batch, self.device)
