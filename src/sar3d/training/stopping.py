"""Early stopping on a plateau of the validation score, with the best score remembered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


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
