"""3D-Jig (Taleb et al. 2020): the 27 patches of a 3x3x3 grid, shuffled by one of 100 permutations; name it.

Each cube gives 27 jittered patches (as 3D-RPL, 16x16x8 at 64x64x32), put in
the order of a permutation drawn from a fixed table of 100; the shared encoder
codes each patch, the 27 codes are concatenated in input order and classified
into the 100 permutations. The table is data (``data/jigsaw_permutations.txt``):
100 distinct uniform permutations of 27, drawn with duplicates rejected, as the
original ``permutations3d_100_27.npy`` was (it is not a maximal-Hamming set),
but from a fixed seed so :func:`generate_permutations` reproduces it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sar3d.pretraining.methods.patches import GridTaskViews, PatchClassifier
from sar3d.pretraining.methods.pretext import PatchTaskMethod
from sar3d.pretraining.registry import register

__all__ = [
    "PERMUTATIONS_FILE",
    "PERMUTATION_SEED",
    "Jigsaw",
    "JigsawViews",
    "generate_permutations",
    "jigsaw_head",
    "load_permutations",
]

GRID = (3, 3, 3)
N_PATCHES = 27
N_PERMUTATIONS = 100
PERMUTATION_SEED = 2020
"""Seed of the torch.Generator that draws the stored table (the year of Taleb et al.)."""
PERMUTATIONS_FILE = Path(__file__).resolve().parent / "data" / "jigsaw_permutations.txt"


def generate_permutations(n: int = N_PERMUTATIONS, size: int = N_PATCHES, seed: int = PERMUTATION_SEED) -> Tensor:
    """``n`` distinct uniform permutations of ``range(size)`` ``(n, size)``, drawn in order, duplicates redrawn."""
    if n > math.factorial(size):
        raise ValueError(f"there are fewer than {n} permutations of {size} items")
    generator = torch.Generator().manual_seed(seed)
    rows: list[Tensor] = []
    seen: set[tuple[int, ...]] = set()
    while len(rows) < n:
        row = torch.randperm(size, generator=generator)
        if tuple(row.tolist()) not in seen:
            seen.add(tuple(row.tolist()))
            rows.append(row)
    return torch.stack(rows)


@lru_cache(maxsize=1)
def load_permutations() -> Tensor:
    """The stored table ``(100, 27)`` (int64, 0-based): row ``p`` puts the patch of cell ``p[i]`` at input ``i``."""
    return torch.from_numpy(np.loadtxt(PERMUTATIONS_FILE, dtype=np.int64, ndmin=2))


class JigsawViews(GridTaskViews):
    """Per cube: its 27 grid patches in the order of a random row of the permutation table, and that row's index.

    Args:
        cube: spatial size of the cubes.
        patch: patch size.
        jitter: random place of each patch inside its cell (False: centred).
        permutations: ``(P, 27)`` table; the stored one by default.
    """

    n_classes = N_PERMUTATIONS

    def __init__(self, cube: Sequence[int], patch: Sequence[int], jitter: bool = True,
                 permutations: Tensor | None = None) -> None:
        super().__init__(cube, patch, jitter)
        self.permutations = load_permutations() if permutations is None else permutations

    def randomize(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Corners ``(batch, 27, 3)`` already in input order, and permutation labels ``(batch,)``."""
        corners = self.cut.randomize(batch, generator)
        labels = torch.randint(0, len(self.permutations), (batch,), generator=generator, device=generator.device)
        order = self.permutations.to(corners.device)[labels]  # (B, 27): cell shown at each input position
        return torch.gather(corners, 1, order[..., None].expand(-1, -1, 3)), labels


def jigsaw_head(channels: int, patch: Sequence[int], embed: int, hidden: Sequence[int],
                n_permutations: int = N_PERMUTATIONS, dropout: float = 0.5) -> PatchClassifier:
    """Shared code of each of the 27 patches, concatenated in input order → MLP → permutation logits."""
    return PatchClassifier(channels, patch, N_PATCHES, n_permutations, embed, hidden, dropout)


@register
class Jigsaw(PatchTaskMethod):
    """3D-Jig on the shared encoder; fine-tuning receives the encoder only.

    Loss: softmax cross-entropy over the permutations (``loss_jig``), logged with its accuracy (``acc_jig``).
    """

    kind = "jigsaw"
    display = "3D-Jig"
    rank = 30.0
    views_class = JigsawViews
    head_factory = staticmethod(jigsaw_head)
    term = "loss_jig"
