"""3D-Rot (Taleb et al. 2020): classify which of 10 rotations turned a cubic view of the cube.

The 10 classes are the identity and 90°, 180°, 270° about each of the three
axes. A 90° turn about x or y swaps the 32-voxel axis of a 64x64x32 cube with a
64-voxel one, so the view is a random 32³ crop of the cube (documented in
docs/deviations.md): cubic, so every rotation keeps its shape, and cropped
rather than resampled, so voxels stay isotropic and no rotation can be read
off the voxel aspect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sar3d.pretraining.methods.patches import (
    MLPHead,
    check_head,
    check_patch,
    deepest_size,
    gather_boxes,
    read_block,
)
from sar3d.pretraining.methods.pretext import HEAD_SCHEMA, PretextMethod
from sar3d.pretraining.registry import register

__all__ = [
    "N_ROTATIONS",
    "Rotation",
    "RotationConfig",
    "RotationHead",
    "RotationViews",
    "rotate",
]

N_ROTATIONS = 10
"""Identity + 3 quarter-turn counts x 3 axes."""

# dims of a (B, C, X, Y, Z) tensor that a turn about spatial axis 0, 1, 2 rotates, right-handed:
# about x, y goes to z; about y, z goes to x; about z, x goes to y.
PLANES = ((3, 4), (4, 2), (2, 3))


def rotation_of(label: int) -> tuple[int, int]:
    """``(axis, quarter_turns)`` of a class; the identity (0) is ``(0, 0)``."""
    if label == 0:
        return 0, 0
    return (label - 1) // 3, (label - 1) % 3 + 1


def rotate(views: Tensor, labels: Tensor) -> Tensor:
    """Each cubic view ``(B, C, s, s, s)`` turned by its class (:func:`rotation_of`)."""
    out = views.clone()
    for label in labels.unique().tolist():
        axis, turns = rotation_of(int(label))
        if turns:
            mask = labels == label
            out[mask] = torch.rot90(views[mask], turns, PLANES[axis])
    return out


@dataclass(frozen=True)
class RotationConfig:
    """3D-Rot settings. ``side``: cubic view side; ``hidden``: full-width FC widths (scaled by ``pretrain.width``)."""

    side: int = 32
    hidden: tuple[int, ...] = (2048, 1024)
    dropout: float = 0.5

    @classmethod
    def from_config(cls, block: Mapping[str, Any], cube: Sequence[int], width: float, key: str) -> RotationConfig:
        """Read and check a config block; errors name ``key`` (e.g. ``pretrain.rotation``)."""
        cfg = read_block(cls, block, key)
        check_patch((cfg.side,) * 3, cube, (1, 1, 1), f"{key}.side")
        check_head(cfg.hidden, width, N_ROTATIONS, f"{key}.hidden")
        return cfg


class RotationViews:
    """Random cubic crops of the cubes, each turned by a random one of :data:`N_ROTATIONS` rotations.

    Args:
        cube: spatial size of the cubes.
        side: side of the cubic view.
    """

    def __init__(self, cube: Sequence[int], side: int) -> None:
        self.side = int(side)
        self.room = torch.tensor([int(c) - self.side for c in cube])

    def randomize(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Crop corners ``(batch, 1, 3)`` and rotation classes ``(batch,)``."""
        device = generator.device
        u = torch.rand((batch, 1, 3), generator=generator, device=device)
        corners = (u * (self.room.to(device) + 1)).long()
        labels = torch.randint(0, N_ROTATIONS, (batch,), generator=generator, device=device)
        return corners, labels

    def apply(self, cubes: Tensor, corners: Tensor, labels: Tensor) -> Tensor:
        """One view per cube ``(B, 1, C, s, s, s)``, the layout of the patch methods' views."""
        return rotate(gather_boxes(cubes, corners, (self.side,) * 3)[:, 0], labels)[:, None]

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(views (B, 1, C, s, s, s), labels (B,))``."""
        corners, labels = self.randomize(cubes.shape[0], generator)
        return self.apply(cubes, corners, labels), labels


class RotationHead(nn.Module):
    """Flattened deepest encoder map of the view → ``big_fully`` MLP → rotation logits.

    Args:
        channels: channels of the deepest encoder map.
        side: view side.
        hidden: hidden widths (already scaled).
        dropout: dropout of the MLP.
    """

    def __init__(self, channels: int, side: int, hidden: Sequence[int], dropout: float = 0.5) -> None:
        super().__init__()
        d = deepest_size((side,) * 3)
        self.mlp = MLPHead(channels * d[0] * d[1] * d[2], hidden, N_ROTATIONS, dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.mlp(features[-1])


@register
class Rotation(PretextMethod):
    """3D-Rot on the shared encoder; fine-tuning receives the encoder only.

    Loss: softmax cross-entropy over the 10 rotations (``loss_rot``), logged with its accuracy (``acc_rot``).
    """

    kind = "rotation"
    display = "3D-Rot"
    rank = 40.0
    block_schema: ClassVar[dict[str, Any]] = {
        "side": {"type": "integer", "minimum": 1, "default": 32,
                 "description": "Side of the cubic view: a multiple of 8, at most the shortest side of cubes.size."},
        **HEAD_SCHEMA,
    }
    read = staticmethod(RotationConfig.from_config)
    term = "loss_rot"

    def build_views(self) -> RotationViews:
        return RotationViews(self.cube, self.task.side)

    def build_head(self, channels: int) -> nn.Module:
        return RotationHead(channels, self.task.side, self.hidden(), self.task.dropout)
