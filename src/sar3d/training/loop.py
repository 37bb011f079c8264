"""The epoch loop shared by pre-training and fine-tuning: train, validate, schedule, stop early,
keep the best weights, log and checkpoint every epoch, resume from the last one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sar3d.training import checkpoints
from sar3d.training.metering import log_epoch
from sar3d.training.stopping import EarlyStopping

log = logging.getLogger(__name__)

@dataclass
class Fit:
    """The objects one training job rebuilds from its config before :func:`fit` runs it."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.ReduceLROnPlateau]
    stopper: EarlyStopping
    checkpoint: Path
    fingerprint: str
    epochs: int
    keep_best: tuple[str, ...] = ("unet",)
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None
    is_main: bool = True  # only the main rank writes checkpoints and logs


def fit(
    job: Fit,
    train_epoch: Callable[[int], tuple[dict[str, float], dict[str, float]]],
    validate: Callable[[int], tuple[dict[str, float], float]],
    logger: Any = None,
) -> checkpoints.TrainState:
    """Run (or continue) the epoch loop shared by pre-training and fine-tuning.

    ``train_epoch(epoch) -> (mean train metrics, perf metrics)`` and
    ``validate(epoch) -> (val metrics, score to minimise)``. After each epoch the
    schedulers and the early stopper see the score, the best weights of the
    models in ``keep_best`` are kept, the epoch goes to MLflow and the full state
    is checkpointed - so a job killed at any point resumes from its last epoch.
    """
    kwargs = dict(
        models=job.models, optimizers=job.optimizers, schedulers=job.schedulers,
        stopper=job.stopper, scaler=job.scaler, generators=job.generators,
    )
    state = checkpoints.load_checkpoint(job.checkpoint, job.fingerprint, **kwargs)
    state = state or checkpoints.TrainState(job.fingerprint)
    while not state.finished and state.epoch < job.epochs:
        epoch = state.epoch
        for model in job.models.values():
            model.train()
        train, perf = train_epoch(epoch)
        for model in job.models.values():
            model.eval()
        with torch.no_grad():
            val, score = validate(epoch)
        record = log_epoch(logger if job.is_main else None, epoch, train, val, job.optimizers, perf)
        for scheduler in job.schedulers.values():
            scheduler.step(score)
        improved = job.stopper.step(score, epoch)
        if improved or not state.best_weights:
            state.best_weights = {k: checkpoints.cpu_state_dict(job.models[k]) for k in job.keep_best}
        state.history.append(record)
        state.epoch = epoch + 1
        state.finished = job.stopper.should_stop or state.epoch >= job.epochs
        if job.stopper.should_stop:
            log.info("early stop after epoch %d (best epoch %d)", epoch, job.stopper.best_epoch)
        if job.is_main:
            checkpoints.save_checkpoint(job.checkpoint, state, **kwargs)
    return state


def final_metrics(state: checkpoints.TrainState, stopper: EarlyStopping, epochs: int) -> dict[str, float]:
    """Summary of a finished loop, logged once at the end of a run."""
    return {
        "final/best_score": stopper.best,
        "final/best_epoch": float(stopper.best_epoch),
        "final/epochs_run": float(state.epoch),
        "final/stopped_early": float(state.epoch < epochs),
    }
