"""Per-epoch metering and logging: per-term losses, the learning rate of every parameter group,
epoch time, samples/s and the data-wait fraction, to MLflow with ``step = epoch``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

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
