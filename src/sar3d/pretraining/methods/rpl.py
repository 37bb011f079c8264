"""3D-RPL (Taleb et al. 2020): from the centre patch of a 3x3x3 grid and one neighbour, tell which of 26.

Each cube is split into a centred 3x3x3 grid of cells; the centre patch and the
patch of a random neighbour cell, each at a random place inside its cell (the
jitter that keeps low-level continuity across cell borders from giving the
answer away), go through the shared encoder; their codes are concatenated and
classified into the 26 neighbour offsets. Patch size at 64x64x32: 16x16x8
(docs/deviations.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from sar3d.pretraining.methods.patches import GridTaskViews, PatchClassifier
from sar3d.pretraining.methods.pretext import PatchTaskMethod
from sar3d.pretraining.registry import register

__all__ = ["GRID", "N_NEIGHBOURS", "OFFSETS", "RPLViews", "RelativePatchLocation", "rpl_head"]

GRID = (3, 3, 3)
CENTRE = 13
"""Raster index (last axis fastest) of the centre cell of the 3x3x3 grid."""
OFFSETS = tuple(o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0))
"""Grid offset of the neighbour for each of the 26 labels (raster order, centre left out)."""
N_NEIGHBOURS = len(OFFSETS)


class RPLViews(GridTaskViews):
    """Per cube: ``[centre patch, neighbour patch]`` and the neighbour's label (index into :data:`OFFSETS`)."""

    n_classes = N_NEIGHBOURS

    def randomize(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Corners ``(batch, 2, 3)`` of the centre and neighbour patches, and labels ``(batch,)``."""
        corners = self.cut.randomize(batch, generator)
        labels = torch.randint(0, N_NEIGHBOURS, (batch,), generator=generator, device=generator.device)
        cell = labels + (labels >= CENTRE).long()  # skip the centre in the raster order
        rows = torch.arange(batch, device=corners.device)
        return torch.stack((corners[:, CENTRE], corners[rows, cell]), dim=1), labels


def rpl_head(channels: int, patch: Sequence[int], embed: int, hidden: Sequence[int],
             dropout: float = 0.5) -> PatchClassifier:
    """Shared code of the centre and the neighbour patch, concatenated → MLP → 26 logits."""
    return PatchClassifier(channels, patch, 2, N_NEIGHBOURS, embed, hidden, dropout)


@register
class RelativePatchLocation(PatchTaskMethod):
    """3D-RPL on the shared encoder; fine-tuning receives the encoder only.

    Loss: softmax cross-entropy over the 26 neighbour positions (``loss_rpl``), logged with its accuracy (``acc_rpl``).
    """

    kind = "rpl"
    display = "3D-RPL"
    rank = 20.0
    views_class = RPLViews
    head_factory = staticmethod(rpl_head)
    term = "loss_rpl"
