"""The Models Genesis corruption's probabilities and sizes (``pretrain.transforms``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sar3d.schema import dataclass_from


@dataclass(frozen=True)
class GenesisConfig:
    """The transform probabilities and sizes; fields are exactly ``pretrain.transforms``'s keys."""

    flip_rate: float = 0.4
    local_shuffle_rate: float = 0.5
    local_shuffle_windows: int = 10000
    local_shuffle_max_window: tuple[int, int, int] = (6, 6, 3)
    nonlinear_rate: float = 0.9
    nonlinear_inverse_rate: float = 0.5
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    inpaint_max_boxes: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_shuffle_max_window", tuple(int(v) for v in self.local_shuffle_max_window))
        for name in ("flip_rate", "local_shuffle_rate", "nonlinear_rate", "nonlinear_inverse_rate",
                     "paint_rate", "inpaint_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GenesisConfig.{name} must be in [0, 1], got {value}")
        if len(self.local_shuffle_max_window) != 3 or min(self.local_shuffle_max_window) < 1:
            raise ValueError(f"GenesisConfig.local_shuffle_max_window must be 3 positive ints, "
                             f"got {self.local_shuffle_max_window}")
        if self.local_shuffle_windows < 0:
            raise ValueError("GenesisConfig.local_shuffle_windows must be >= 0")
        if self.inpaint_max_boxes < 1:
            raise ValueError("GenesisConfig.inpaint_max_boxes must be >= 1")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], key: str = "pretrain.transforms") -> GenesisConfig:
        """Build from ``config["pretrain"]["transforms"]`` (or a block's own ``key``); unknown keys are errors."""
        return dataclass_from(cls, section, key)
