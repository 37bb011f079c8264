"""Training machinery shared by pre-training and fine-tuning.

Both stages train for epochs of a fixed number of steps, validate after each
epoch, schedule the learning rate with ``ReduceLROnPlateau`` on the validation
loss, stop early on a plateau and keep the best weights. Everything here exists
once so the two stages cannot drift apart:

* :func:`resolve_device`, :func:`autocast`, :func:`make_grad_scaler`,
  :func:`to_device` - CUDA paths (mixed precision, ``channels_last_3d``, pinned
  memory, non-blocking copies) written for real, but inert on CPU unless asked.
* :class:`EarlyStopping` - the plateau tracker that also remembers the best score.
* :class:`TrainState` / :func:`save_checkpoint` / :func:`load_checkpoint` - one
  atomic file with models, optimisers, schedulers, the epoch, the best weights
  and *every* random state (torch CPU/CUDA, numpy, python, our generators), so a
  killed job continues exactly where the last finished epoch left it.
* :class:`Distributed`, :func:`init_distributed`, :func:`wrap_ddp` - torchrun
  multi-GPU runs (rank-0-only logging and checkpoints), inert in one process.
* :class:`EpochMeter` and :func:`log_epoch` - per-term losses, learning rate of
  every parameter group, epoch time, cubes/s and the data-wait fraction, to
  MLflow with ``step = epoch``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sar3d.io import atomic_output

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (Linux; else a no-op).

    Why: a batch of cubes is ~16 MB per tensor, above glibc's mmap threshold, so
    every temporary is a fresh mapping that page-faults on first touch; on one
    CPU thread that tripled the cost of the intensity lookup. This is what the
    PyTorch CPU tuning advice gets from preloading jemalloc/tcmalloc. Returns
    whether the setting took.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def set_determinism() -> None:
    """Same config => same numbers on CPU; on CUDA, deterministic kernels where they exist."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        torch.backends.cudnn.benchmark = False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    ``auto`` means bf16 on a CUDA device that supports it (fp16 otherwise) and
    full precision on CPU, so CPU runs are bit-reproducible by default.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # pragma: no cover
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context; a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is only needed for fp16 on CUDA; elsewhere the scaler is disabled (a pass-through)."""
    enabled = device.type == "cuda" and dtype == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; on CUDA use ``channels_last_3d``, which the 3D conv kernels prefer."""
    model = model.to(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def to_device(tensor: torch.Tensor, device: torch.device, volume: bool = True) -> torch.Tensor:
    """Non-blocking copy (pinned memory makes it asynchronous); 5D volumes go ``channels_last_3d`` on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    out = tensor.to(device, non_blocking=True)  # pragma: no cover - needs a GPU
    if volume and out.dim() == 5:  # pragma: no cover
        out = out.contiguous(memory_format=torch.channels_last_3d)
    return out  # pragma: no cover


def pin_memory_default(device: torch.device) -> bool:
    return device.type == "cuda"


# --------------------------------------------------------------------------- distributed (torchrun)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job; the defaults are a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, checkpoints and writes outputs: the ranks hold the same weights."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Distributed:
        """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (absent: a single process)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        dist = cls(rank=rank, local_rank=int(env.get("LOCAL_RANK", str(rank))), world_size=world)
        if not 0 <= dist.rank < dist.world_size:
            raise ValueError(f"RANK={dist.rank} is not in [0, WORLD_SIZE={dist.world_size})")
        return dist


def init_distributed(dist: Distributed, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); returns this rank's device.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``. A single process
    returns ``device`` untouched and never touches ``torch.distributed``.
    """
    if not dist.enabled:
        return device
    backend = "gloo"
    if device.type == "cuda":  # pragma: no cover - needs GPUs
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
    return device


def wrap_ddp(module: torch.nn.Module, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` in a multi-process run (gradients averaged over ranks)."""
    if not dist.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def sync_buffers(modules: Iterable[torch.nn.Module], dist: Distributed) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP averages gradients, so parameters agree, but each rank's last forward
    leaves its own batch statistics in the buffers; validation, and with it the
    scheduler and early stopping, must see the same model on every rank.
    """
    if not dist.enabled:
        return
    for module in modules:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


# --------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Tracks the best validation score and how many epochs have passed without improving on it.

    Uses the same relative threshold as ``ReduceLROnPlateau`` so "improved" means
    the same thing to the scheduler and to the stopper.
    """

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 1e-4) -> None:
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def is_better(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if math.isinf(self.best):
            return score < self.best if self.mode == "min" else score > self.best
        margin = abs(self.best) * self.min_delta
        return score < self.best - margin if self.mode == "min" else score > self.best + margin

    def step(self, score: float, epoch: int) -> bool:
        """Record one epoch's score; True when it is a new best."""
        if self.is_better(score):
            self.best, self.best_epoch, self.bad_epochs = float(score), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience, "mode": self.mode, "min_delta": self.min_delta,
            "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


# --------------------------------------------------------------------------- random states


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training loop might touch, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), *np_state[2:]),
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover - needs a GPU
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict: safe to keep as 'best' while training goes on."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# settings that change how fast a job runs or which other jobs exist, never what it computes
NOT_FINGERPRINTED = frozenset({"device", "num_workers", "methods", "inits", "ablation_inits", "label_ratios"})


def fingerprint(obj: Any) -> str:
    """Short stable hash of the settings a checkpoint was made under (minus :data:`NOT_FINGERPRINTED`)."""

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in NOT_FINGERPRINTED}
        return value

    return hashlib.sha256(json.dumps(strip(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    """What a resumed job needs besides the objects it rebuilds from the config."""

    fingerprint: str
    epoch: int = 0  # next epoch to run
    finished: bool = False
    best_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: Path,
    state: TrainState,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    stopper: EarlyStopping,
    scaler: torch.amp.GradScaler | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Write the full training state atomically (a killed save never replaces a good checkpoint)."""
    payload = {
        "format": "sar3d-checkpoint-1",
        "fingerprint": state.fingerprint,
        "epoch": state.epoch,
        "finished": state.finished,
        "best_weights": state.best_weights,
        "history": state.history,
        "extra": state.extra,
        "models": {k: m.state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "stopper": stopper.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": capture_rng_state(generators),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: Path,
    fingerprint_: str,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    stopper: EarlyStopping,
    scaler: torch.amp.GradScaler | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> TrainState | None:
    """Restore everything from ``path`` if it exists and was made under the same settings.

    Returns None (start afresh) when there is no checkpoint or its fingerprint
    differs: continuing a run made under another config would mix two studies.
    """
    path = Path(path)
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != fingerprint_:
        log.warning("%s was made under other settings; starting afresh", path)
        return None
    for k, m in models.items():
        m.load_state_dict(payload["models"][k])
    for k, o in optimizers.items():
        o.load_state_dict(payload["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(payload["schedulers"][k])
    stopper.load_state_dict(payload["stopper"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    restore_rng_state(payload["rng"], generators)
    log.info("resuming from %s at epoch %d", path, payload["epoch"])
    return TrainState(
        fingerprint=fingerprint_,
        epoch=int(payload["epoch"]),
        finished=bool(payload["finished"]),
        best_weights=payload["best_weights"],
        history=list(payload["history"]),
        extra=dict(payload["extra"]),
    )


def save_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """A plain ``{name: tensor}`` file (loads with ``weights_only=True``), written atomically."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_output(path) as tmp:
        torch.save(plain, tmp)


# --------------------------------------------------------------------------- metering and logging


class EpochMeter:
    """Running means of named scalars plus the timing of one epoch.

    ``wait()`` wraps the fetch of the next batch so the fraction of the epoch spent
    waiting for data is measured, not guessed.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.samples = 0
        self.steps = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def update(self, values: Mapping[str, float | torch.Tensor], n: int = 1) -> None:
        """Accumulate; tensors stay on their device until :meth:`means` (one GPU sync per epoch)."""
        for k, v in values.items():
            self.sums[k] = self.sums[k] + (v.detach().float() if isinstance(v, torch.Tensor) else float(v)) * n
            self.counts[k] += n

    def add_step(self, n_samples: int) -> None:
        self.samples += n_samples
        self.steps += 1

    @contextlib.contextmanager
    def wait(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t0

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in self.sums if self.counts[k]}

    def timing(self, unit: str = "samples") -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "perf/epoch_time_s": elapsed,
            f"perf/{unit}_per_s": self.samples / elapsed,
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "perf/data_wait_fraction": self.data_wait / elapsed,
        }


def learning_rates(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
    """``lr/<optimiser>/<group name or index>`` for every parameter group."""
    out: dict[str, float] = {}
    for name, opt in optimizers.items():
        for i, group in enumerate(opt.param_groups):
            out[f"lr/{group.get('name', f'{name}{i}' if len(opt.param_groups) > 1 else name)}"] = group["lr"]
    return out


def log_epoch(
    logger: Any,
    epoch: int,
    train: Mapping[str, float],
    val: Mapping[str, float],
    optimizers: Mapping[str, torch.optim.Optimizer],
    perf: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Log one epoch to MLflow (step = epoch) and return the flat record kept in the history."""
    record = {
        **{f"train/{k}": float(v) for k, v in train.items()},
        **{f"val/{k}": float(v) for k, v in val.items()},
        **learning_rates(optimizers),
        **dict(perf or {}),
    }
    finite = {k: v for k, v in record.items() if math.isfinite(v)}
    if logger is not None:
        logger.metrics(finite, step=epoch)
    log.info(
        "epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if not k.startswith("perf/"))
    )
    return {"epoch": float(epoch), **record}


def progress(iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """tqdm bar for one epoch; silent when stderr is not a terminal (cluster logs stay readable)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


# --------------------------------------------------------------------------- the epoch loop


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
) -> TrainState:
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
    state = load_checkpoint(job.checkpoint, job.fingerprint, **kwargs) or TrainState(job.fingerprint)
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
            state.best_weights = {k: cpu_state_dict(job.models[k]) for k in job.keep_best}
        state.history.append(record)
        state.epoch = epoch + 1
        state.finished = job.stopper.should_stop or state.epoch >= job.epochs
        if job.stopper.should_stop:
            log.info("early stop after epoch %d (best epoch %d)", epoch, job.stopper.best_epoch)
        if job.is_main:
            save_checkpoint(job.checkpoint, state, **kwargs)
    return state


def final_metrics(state: TrainState, stopper: EarlyStopping, epochs: int) -> dict[str, float]:
    """Summary of a finished loop, logged once at the end of a run."""
    return {
        "final/best_score": stopper.best,
        "final/best_epoch": float(stopper.best_epoch),
        "final/epochs_run": float(state.epoch),
        "final/stopped_early": float(state.epoch < epochs),
    }
