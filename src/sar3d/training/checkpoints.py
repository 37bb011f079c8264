"""One atomic file with models, optimisers, schedulers, the epoch, the best weights and *every*
random state, so a killed job continues exactly where its last finished epoch left it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar3d.io import atomic_output
from sar3d.training.stopping import EarlyStopping

log = logging.getLogger(__name__)

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
