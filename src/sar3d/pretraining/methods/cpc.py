"""3D-CPC (Taleb et al. 2020): from the first two rows of a 4x4x4 patch grid, predict the codes of the last two.

The cube is shifted by a random 0.95 crop (padded back), cut into a 4x4x4 grid
of non-overlapping cells (16x16x8 at 64x64x32), and each patch keeps a random
7/8 crop of itself (the rest zeroed) and is flipped along x with p 0.5, so
borders and low-level continuity give nothing away. Rows run along x. For each
(y, z) column a GRU reads a pyramid of 10 patch codes, the mirror-padded 3x3
neighbourhood in row 0 and the column's patch in row 1, and one linear map per
predicted row turns its state into the codes of rows 2 and 3. A pair scores
``mean(prediction * codes)`` over rows and code units; each column is paired
with its own rows 2-3 (positive) and with rows 2-3 of a random other column or
volume of the batch (negative); binary cross-entropy on the scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.pretraining.methods.patches import (
    POOLINGS,
    GridCut,
    PatchEmbedding,
    SettingError,
    gather_boxes,
    read_block,
    scaled,
)
from sar3d.pretraining.methods.pretext import PretextMethod
from sar3d.pretraining.registry import register

__all__ = [
    "GRID",
    "CPCConfig",
    "CPCHead",
    "CPCViews",
    "ContrastivePredictiveCoding",
    "context_sequence",
    "cpc_loss",
    "cpc_targets",
    "cpc_terms",
]

GRID = 4
CONTEXT_ROWS = 2
"""Rows 0 and 1 (along x) are context; rows 2 and 3 are predicted."""
N_COLUMNS = GRID * GRID
PYRAMID = 10
"""Context length per column: 3x3 patches of row 0, then the column's patch of row 1."""


@dataclass(frozen=True)
class CPCConfig:
    """3D-CPC settings: cube and patch crop fractions, flip probability, code and GRU widths (full-width, scaled)."""

    crop: float = 0.95
    patch_crop: float = 0.875
    flip: float = 0.5
    code: int = 1024
    context: int = 256

    @classmethod
    def from_config(cls, block: Mapping[str, Any], cube: Sequence[int], width: float, key: str) -> CPCConfig:
        """Read and check a config block; errors name ``key`` (e.g. ``pretrain.cpc``) or ``cubes.size``."""
        cfg = read_block(cls, block, key)
        side = GRID * 2**POOLINGS
        if any(c % side for c in cube):
            raise SettingError(key, f"cubes.size {list(cube)} must split into {GRID}x{GRID}x{GRID} cells whose "
                                    f"sides survive three poolings: every side a multiple of {side}")
        for name in ("crop", "patch_crop"):
            if not 0.5 <= getattr(cfg, name) <= 1.0:
                raise SettingError(f"{key}.{name}", f"must lie in [0.5, 1], got {getattr(cfg, name)}")
        if not 0.0 <= cfg.flip <= 1.0:
            raise SettingError(f"{key}.flip", f"must lie in [0, 1], got {cfg.flip}")
        if scaled(cfg.code, width) < 2 or scaled(cfg.context, width) < 2:
            raise SettingError(key, f"code {cfg.code} / context {cfg.context} scaled by pretrain.width={width} "
                                    "leave fewer than 2 units")
        return cfg


@dataclass(frozen=True)
class CPCParams:
    """The random draws of one batch of CPC views."""

    shift: Tensor  # (B, 1, 3) corner of the cube crop
    keep: Tensor  # (B, 64, 3) corner of each patch's kept crop, inside the cell
    flip: Tensor  # (B, 64) bool: patch flipped along x
    negatives: Tensor  # (B, 16) index into the B·16 (volume, column) pairs; never the pair's own


class CPCViews:
    """The 64 augmented grid patches of each cube (raster order, x slowest) and each column's negative.

    Args:
        cube: spatial size of the cubes (each side divisible by 4).
        crop: fraction of the cube kept by the shifting crop.
        patch_crop: fraction of each patch side kept.
        flip: probability of flipping a patch along x.
    """

    def __init__(self, cube: Sequence[int], crop: float = 0.95, patch_crop: float = 0.875, flip: float = 0.5) -> None:
        self.cube = tuple(int(c) for c in cube)
        self.cell = tuple(c // GRID for c in self.cube)
        self.crop = tuple(round(c * crop) for c in self.cube)
        self.kept = tuple(round(c * patch_crop) for c in self.cell)
        self.cut = GridCut(self.cube, (GRID,) * 3, self.cell, jitter=False)
        self.flip = flip

    def randomize(self, batch: int, generator: torch.Generator) -> CPCParams:
        device = generator.device

        def corner(shape: tuple[int, ...], room: Sequence[int]) -> Tensor:
            u = torch.rand((*shape, 3), generator=generator, device=device)
            return (u * (torch.tensor(list(room), device=device) + 1)).long()

        shift = corner((batch, 1), [c - k for c, k in zip(self.cube, self.crop, strict=True)])
        keep = corner((batch, self.cut.n_cells), [c - k for c, k in zip(self.cell, self.kept, strict=True)])
        flip = torch.rand((batch, self.cut.n_cells), generator=generator, device=device) < self.flip
        own = torch.arange(batch * N_COLUMNS, device=device).reshape(batch, N_COLUMNS)
        other = torch.randint(0, batch * N_COLUMNS - 1, (batch, N_COLUMNS), generator=generator, device=device)
        return CPCParams(shift, keep, flip, other + (other >= own).long())

    def apply(self, cubes: Tensor, params: CPCParams) -> Tensor:
        """Patches ``(B, 64, C, *cell)`` of the shifted cubes, border-zeroed and flipped as drawn."""
        cropped = gather_boxes(cubes, params.shift, self.crop)[:, 0]
        pad = [p for c, k in zip(reversed(self.cube), reversed(self.crop), strict=True) for p in (0, c - k)]
        shifted = F.pad(cropped, pad)
        patches = self.cut(shifted, self.cut.centred(cubes.shape[0], cubes.device))
        inside = []
        for axis, (side, kept) in enumerate(zip(self.cell, self.kept, strict=True)):
            pos = torch.arange(side, device=cubes.device)
            start = params.keep[..., axis, None]
            inside.append((pos >= start) & (pos < start + kept))  # (B, 64, side)
        mask = inside[0][..., :, None, None] & inside[1][..., None, :, None] & inside[2][..., None, None, :]
        patches = patches * mask[:, :, None].to(patches.dtype)
        return torch.where(params.flip[:, :, None, None, None, None], patches.flip(3), patches)

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(patches (B, 64, C, *cell), negatives (B, 16))``."""
        params = self.randomize(cubes.shape[0], generator)
        return self.apply(cubes, params), params.negatives


def context_sequence(codes: Tensor) -> Tensor:
    """Per column, the GRU's input ``(B, 16, 10, D)`` from grid codes ``(B, 4, 4, 4, D)``.

    Row 0's 3x3 neighbourhood of the column (mirror-padded at the grid border,
    raster order), then the column's code in row 1. Rows 2 and 3 never enter.
    """
    b, d = codes.shape[0], codes.shape[-1]
    row0 = F.pad(codes[:, 0].permute(0, 3, 1, 2), (1, 1, 1, 1), mode="reflect")  # (B, D, 6, 6)
    neighbours = F.unfold(row0, kernel_size=3).reshape(b, d, 9, N_COLUMNS).permute(0, 3, 2, 1)
    row1 = codes[:, 1].reshape(b, N_COLUMNS, 1, d)
    return torch.cat((neighbours, row1), dim=2)


def cpc_targets(codes: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """Codes of rows 2-3 per column ``(B, 16, 2, D)``: the column's own (positive) and its negative's."""
    b, d = codes.shape[0], codes.shape[-1]
    future = codes[:, CONTEXT_ROWS:].permute(0, 2, 3, 1, 4).reshape(b * N_COLUMNS, GRID - CONTEXT_ROWS, d)
    return future.reshape(b, N_COLUMNS, -1, d), future[negatives]


class CPCHead(nn.Module):
    """Patch codes (shared linear layer) → GRU over each column's pyramid → one linear prediction per future row.

    Args:
        channels: channels of the deepest encoder map.
        patch: cell size.
        code: code width (scaled).
        context: GRU width (scaled).
    """

    def __init__(self, channels: int, patch: Sequence[int], code: int, context: int) -> None:
        super().__init__()
        self.embedding = PatchEmbedding(channels, patch, code)
        self.gru = nn.GRU(code, context, batch_first=True)
        self.predict = nn.ModuleList(nn.Linear(context, code) for _ in range(GRID - CONTEXT_ROWS))

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(predictions (B, 16, 2, D), codes (B, 4, 4, 4, D))`` from the features of the ``B·64`` patches."""
        codes = self.embedding(features, GRID**3)
        b, d = codes.shape[0], codes.shape[-1]
        codes = codes.reshape(b, GRID, GRID, GRID, d)
        _, state = self.gru(context_sequence(codes).reshape(b * N_COLUMNS, PYRAMID, d))
        predictions = torch.stack([linear(state[-1]) for linear in self.predict], dim=1)
        return predictions.reshape(b, N_COLUMNS, -1, d), codes


def cpc_terms(outputs: tuple[Tensor, Tensor], negatives: Tensor) -> dict[str, Tensor]:
    """The loss terms of :class:`CPCHead` outputs ``(predictions, codes)`` with :class:`CPCViews`' negatives."""
    predictions, codes = outputs
    return cpc_loss(predictions, *cpc_targets(codes, negatives))


def cpc_loss(predictions: Tensor, positives: Tensor, negatives: Tensor) -> dict[str, Tensor]:
    """BCE of the pair scores, one positive and one negative per column (``loss_cpc``), and accuracy (``acc_cpc``)."""
    pos = (predictions * positives).float().mean(dim=(-1, -2))
    neg = (predictions * negatives).float().mean(dim=(-1, -2))
    logits = torch.cat((pos.reshape(-1), neg.reshape(-1)))
    labels = torch.cat((torch.ones_like(pos.reshape(-1)), torch.zeros_like(neg.reshape(-1))))
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    return {"loss_cpc": loss, "acc_cpc": ((logits.detach() > 0).float() == labels).float().mean()}


def _fraction(default: float, low: float, what: str) -> dict[str, Any]:
    return {"type": "number", "minimum": low, "maximum": 1, "default": default, "description": what}


@register
class ContrastivePredictiveCoding(PretextMethod):
    """3D-CPC on the shared encoder; fine-tuning receives the encoder only."""

    kind = "cpc"
    display = "3D-CPC"
    rank = 50.0
    block_schema: ClassVar[dict[str, Any]] = {
        "crop": _fraction(0.95, 0.5, "Fraction of each cube side kept by the shifting crop."),
        "patch_crop": _fraction(0.875, 0.5, "Fraction of each patch side kept (the rest is zeroed)."),
        "flip": _fraction(0.5, 0.0, "Probability of flipping a patch along x."),
        "code": {"type": "integer", "minimum": 1, "default": 1024,
                 "description": "Patch code width at U-Net width 1 (scaled by pretrain.width)."},
        "context": {"type": "integer", "minimum": 1, "default": 256,
                    "description": "GRU width at U-Net width 1 (scaled by pretrain.width)."},
    }
    read = staticmethod(CPCConfig.from_config)
    term = "loss_cpc"

    def build_views(self) -> CPCViews:
        return CPCViews(self.cube, self.task.crop, self.task.patch_crop, self.task.flip)

    def build_head(self, channels: int) -> nn.Module:
        cell = [c // GRID for c in self.cube]
        return CPCHead(channels, cell, self.scaled(self.task.code), self.scaled(self.task.context))

    def terms(self, outputs: Any, target: Tensor) -> dict[str, Tensor]:
        return cpc_terms(outputs, target)
