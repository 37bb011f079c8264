"""The one pre-training run loop: any registered method, one config block, one job.

The loop owns everything a method does not: the device and precision, DDP
wrappers, the optimisers' plateau schedule (the main optimiser's lr follows the
validation ``objective``; other optimisers keep theirs), early stopping, the
checkpoint of every epoch with every random state (a killed job resumes
exactly), MLflow, and the export of the best epoch's U-Net weights (whole, or
the encoder only) to ``out``. Validation batches and their views come from a
generator re-seeded each epoch (the same inputs every epoch) and are normalised
with their own batch statistics (:func:`sar3d.nets.unet.batch_statistics`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from sar3d.nets.unet import batch_statistics
from sar3d.nets.weights import count_parameters
from sar3d.pretraining import registry
from sar3d.pretraining.base import Batch, PretrainJob, PretrainMethod, StepTools, Terms, frozen
from sar3d.pretraining.streams import BatchSource, open_stores, resolve_transform_device
from sar3d.training import checkpoints, devices, distributed, loop, metering
from sar3d.training.stopping import EarlyStopping

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """A built method with what its steps need: optimisers, scaler, precision and (DDP-wrapped) nets.

    Args:
        method: the method, its modules on ``device``.
        optimizers: :meth:`PretrainMethod.optimizers`.
        device: the training device.
        amp: the autocast dtype, or None for full precision.
        scaler: the loss scaler (None: a disabled one).
        net: what the main step's forward runs through (None: the method's own :meth:`network`).
        nets_apart: modules wrapped apart (:meth:`PretrainMethod.wrapped_apart`), possibly DDP.
    """

    method: PretrainMethod
    optimizers: dict[str, torch.optim.Optimizer]
    device: torch.device
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    net: nn.Module | None = None
    nets_apart: dict[str, nn.Module] | None = None

    @classmethod
    def single(cls, method: PretrainMethod, amp: torch.dtype | None = None) -> Trainer:
        """A single-process trainer on the method's device with its own optimisers."""
        return cls(method, method.optimizers(), method.device, amp)

    def train_step(self, batch: Batch) -> Terms:
        """The method's side step (if any), then the main step; terms stay detached tensors on the device.

        Converting each term to a float here would synchronise with the GPU every step.
        """
        method = self.method
        scaler = self.scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        net = self.net or method.network()
        tools = StepTools(self.optimizers, scaler, self.device, self.amp, self.nets_apart or {})
        with devices.autocast(self.device, self.amp):
            outputs = method.forward(net, batch)
        metrics = dict(method.side_step(outputs, batch, tools))
        with frozen(method.frozen_in_main_step()):
            opt = self.optimizers[method.main]
            opt.zero_grad(set_to_none=True)
            with devices.autocast(self.device, self.amp):
                total, terms = method.losses(outputs, batch)
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        metrics.update(terms)
        return metrics

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> Terms:
        """Every term of a validation batch without updating anything."""
        with devices.autocast(self.device, self.amp):
            return {k: v.detach() for k, v in self.method.validation_terms(batch).items()}

    def train_epoch(
        self, source: BatchSource, epoch: int, dist: distributed.Distributed
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One epoch: the method's epoch hook, ``steps_per_epoch`` steps, the ranks' buffers synced.

        Returns the mean train terms and the timing (what :func:`sar3d.training.loop.fit` logs).
        """
        method, settings = self.method, self.method.settings
        method.on_epoch_start(epoch, source.stores.train)
        steps = settings["steps_per_epoch"]
        meter = self.train_steps(source.epoch("train", epoch, steps, settings["num_workers"]), steps,
                                 f"{method.name} {epoch}")
        distributed.sync_buffers(method.modules.values(), dist)
        return meter.means(), meter.timing(method.input)

    def validate(self, source: BatchSource) -> tuple[dict[str, float], float]:
        """Mean terms of the validation batches (the same inputs every epoch) and the ``objective``."""
        meter = metering.EpochMeter()
        with batch_statistics(*self.method.modules.values()):
            for batch in source.epoch("val", 0, self.method.settings["val_steps"], 0):
                meter.update(self.eval_step(batch))
        metrics = meter.means()
        return metrics, metrics["objective"]

    def train_steps(self, stream: Iterator[Batch], steps: int, desc: str = "") -> metering.EpochMeter:
        """``steps`` training steps from ``stream``, timing the wait for each batch apart from the step."""
        meter = metering.EpochMeter()
        for _ in metering.progress(range(steps), steps, desc):
            with meter.wait():
                batch = next(stream)
            meter.update(self.train_step(batch))
            meter.add_step(batch_size(batch))
        return meter


def batch_size(batch: Batch) -> int:
    """Samples in a batch: the length of its first tensor or list."""
    for value in batch.values():
        if isinstance(value, torch.Tensor | list):
            return len(value)
    raise ValueError(f"batch without tensors: keys {sorted(batch)}")


class _NullRun:
    """Stands in for the MLflow run on ranks other than 0, which log nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def run_pretrain(config: dict[str, Any], job: PretrainJob) -> None:
    """Pre-train the method of ``job.method``; write its export (best epoch) and the full checkpoint.

    Args:
        config: the validated study config.
        job: which block, its inputs and outputs.
    """
    from sar3d.tracking import tracked_run

    settings = config["pretrain"]
    dist = distributed.Distributed.from_env()
    device = distributed.init_distributed(dist, devices.resolve_device(settings["device"]))
    devices.set_determinism(device)
    if device.type == "cpu":
        devices.keep_freed_memory()
    amp = devices.resolve_precision(settings["precision"], device)
    method = registry.build(config, job.method, device)
    method.artefact_dirs = dict(job.artefacts)
    missing = sorted(set(method.artefacts) - set(job.artefacts))
    if missing:
        raise ValueError(f"method '{job.method}' needs its artefacts {missing}")
    stores = open_stores(method, job)
    source = BatchSource(
        method, stores, device, resolve_transform_device(settings["transform_device"], device).type == "cpu", dist,
        devices.pin_memory_default(device),
    )
    optimizers = method.optimizers()
    schedulers = {
        method.main: torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizers[method.main], mode="min", factor=settings["plateau"]["factor"],
            patience=settings["plateau"]["patience"],
        )
    }
    scaler = devices.make_grad_scaler(device, amp)
    trainer = Trainer(
        method, optimizers, device, amp, scaler, net=distributed.wrap_ddp(method.network(), dist, device),
        nets_apart={k: distributed.wrap_ddp(m, dist, device) for k, m in method.wrapped_apart().items()},
    )
    stopper = EarlyStopping(settings["early_stopping_patience"])
    fit = loop.Fit(
        models=method.modules, optimizers=optimizers, schedulers=schedulers, stopper=stopper,
        checkpoint=job.checkpoint,
        fingerprint=checkpoints.fingerprint({
            "seed": config["seed"], "method": job.method, **registry.job_settings(config, job.method),
            "data": sorted(d.name for d in (*job.data, *job.volumes)),
        }),
        epochs=settings["epochs"], keep_best=("unet",), scaler=scaler, is_main=dist.is_main,
    )

    tracked = tracked_run(config, "pretrain", {"method": job.method}) if dist.is_main else contextlib.nullcontext(
        _NullRun())
    try:
        with tracked as run:
            run.tags({
                "kind": method.kind, "export": method.export, "device": str(device),
                "precision": str(amp or "fp32"), "world_size": dist.world_size,
                "transform_device": "loader (cpu)" if source.views_in_loader else str(device),
                "n_train_samples": len(stores.train), "validation_on": stores.validation_on,
                **{f"parameters_{k}": count_parameters(m) for k, m in method.modules.items()},
            })
            state = loop.fit(fit, partial(trainer.train_epoch, source, dist=dist),
                             lambda epoch: trainer.validate(source), run)
            if dist.is_main:
                checkpoints.save_state_dict(job.out, method.exported(state.best_weights["unet"]))
                run.metrics(loop.final_metrics(state, stopper, settings["epochs"]))
                run.artifact(job.out)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
