"""Shared pieces of the Taleb et al. (2020) baselines: grid patches, patch embeddings, MLP heads, checks.

3D-RPL, 3D-Jig and 3D-CPC all cut a cube into a grid of patches, run every
patch through the shared U-Net encoder and read its deepest map; 3D-Rot, RPL
and Jig end in the same fully connected classifier. Those pieces live here once
so the method modules only hold what differs: their views, head layout and loss term.
The method classes they share are in :mod:`sar3d.pretraining.methods.pretext`.

Every random draw comes from the ``torch.Generator`` the caller passes, and the
draws happen in ``randomize()`` apart from the deterministic ``__call__``/apply
step, so a test can replay a view from its parameters.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from sar3d.pretraining import losses

__all__ = [
    "POOLINGS",
    "GridCut",
    "GridTaskViews",
    "MLPHead",
    "PatchClassifier",
    "PatchEmbedding",
    "PatchTaskConfig",
    "PretextNet",
    "SettingError",
    "check_head",
    "check_patch",
    "deepest_size",
    "encode_patches",
    "gather_boxes",
    "grid_layout",
    "read_block",
    "scaled",
]

POOLINGS = 3
"""2x poolings of the Models Genesis encoder: a patch side must be a multiple of 2**POOLINGS."""

Size3 = tuple[int, int, int]
ConfigT = TypeVar("ConfigT")


class SettingError(ValueError):
    """A method setting that cannot work; ``key`` is its config path (e.g. ``pretrain.methods.rpl.patch``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def read_block(cls: type[ConfigT], block: Mapping[str, Any], key: str) -> ConfigT:
    """A method's settings dataclass from its config block (lists become tuples); unknown keys name ``key``."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(block) - known)
    if unknown:
        raise SettingError(key, f"unknown setting(s) {unknown} (known: {sorted(known)})")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in block.items()})


def scaled(units: int, width: float) -> int:
    """Head width under the U-Net's width multiplier, with the U-Net's own rounding (never below 1)."""
    return max(1, round(units * width))


def check_patch(patch: Sequence[int], cube: Sequence[int], grid: Sequence[int], key: str) -> Size3:
    """The patch size, or a ``ValueError`` naming ``key`` when it cannot pass three poolings or fill the grid.

    Why: a side that is not a multiple of 8 would be floored by the max-poolings
    (the deepest map would silently drop border voxels), and ``grid`` cells of
    ``patch`` must fit inside the cube.
    """
    patch = tuple(int(p) for p in patch)
    stride = 2**POOLINGS
    if len(patch) != 3 or any(p < stride or p % stride for p in patch):
        raise SettingError(key, f"every patch side must be a positive multiple of {stride} "
                                f"(three 2x poolings), got {list(patch)}")
    if any(g * p > c for g, p, c in zip(grid, patch, cube, strict=True)):
        raise SettingError(key, f"a {list(grid)} grid of {list(patch)} patches does not fit "
                                f"the {list(cube)} cube (cubes.size)")
    return patch  # type: ignore[return-value]


def deepest_size(patch: Sequence[int]) -> Size3:
    """Spatial size of the encoder's deepest map for a patch (sides already checked by :func:`check_patch`)."""
    return tuple(int(p) // 2**POOLINGS for p in patch)  # type: ignore[return-value]


def grid_layout(cube: Sequence[int], grid: Sequence[int], patch: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Cell origins ``(N, 3)`` in raster order (last axis fastest) and each cell's slack ``(3,)``.

    Cells are ``cube // grid`` voxels; the grid is centred (the remainder is
    split between both borders) and a patch may sit anywhere in its cell's slack.
    """
    cell = torch.tensor([c // g for c, g in zip(cube, grid, strict=True)])
    margin = (torch.tensor(list(cube)) - cell * torch.tensor(list(grid))) // 2
    index = torch.cartesian_prod(*(torch.arange(g) for g in grid)).reshape(-1, 3)
    return margin + index * cell, cell - torch.tensor(list(patch))


def gather_boxes(volumes: Tensor, corners: Tensor, size: Sequence[int]) -> Tensor:
    """Boxes of ``size`` at per-volume ``corners`` ``(B, N, 3)``: ``(B, N, C, *size)``, one indexing op.

    Why: a Python loop over 8 x 27 patches costs more than the gather itself.
    """
    b, n = corners.shape[:2]
    steps = [torch.arange(s, device=volumes.device) for s in size]
    x = (corners[..., 0, None] + steps[0]).reshape(b, n, -1, 1, 1)
    y = (corners[..., 1, None] + steps[1]).reshape(b, n, 1, -1, 1)
    z = (corners[..., 2, None] + steps[2]).reshape(b, n, 1, 1, -1)
    batch = torch.arange(b, device=volumes.device).reshape(b, 1, 1, 1, 1)
    boxes = volumes.movedim(1, -1)[batch, x, y, z]  # (B, N, sx, sy, sz, C)
    return boxes.movedim(-1, 2)


class GridCut:
    """A grid of patches per cube, each at a uniformly random place inside its cell (the methods' jitter).

    Args:
        cube: spatial size of the cubes.
        grid: cells per axis.
        patch: patch size (at most the cell size).
        jitter: random place inside the cell; False puts every patch at its cell's centre.
    """

    def __init__(self, cube: Sequence[int], grid: Sequence[int], patch: Sequence[int], jitter: bool = True) -> None:
        self.patch = tuple(int(p) for p in patch)
        self.origins, self.slack = grid_layout(cube, grid, patch)
        if bool((self.slack < 0).any()):
            raise ValueError(f"patch {list(patch)} is larger than a cell of the {list(grid)} grid on {list(cube)}")
        self.jitter = jitter

    @property
    def n_cells(self) -> int:
        return int(self.origins.shape[0])

    def centred(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """Corners ``(batch, n_cells, 3)`` of patches centred in their cells (no draw)."""
        return (self.origins + self.slack // 2).to(device).expand(batch, -1, -1).clone()

    def randomize(self, batch: int, generator: torch.Generator) -> Tensor:
        """Patch corners ``(batch, n_cells, 3)`` (int64, on the generator's device)."""
        device = generator.device
        if not self.jitter:
            return self.centred(batch, device)
        u = torch.rand((batch, self.n_cells, 3), generator=generator, device=device)
        offset = (u * (self.slack.to(device) + 1)).long()  # uniform on 0..slack
        return self.origins.to(device) + offset

    def __call__(self, cubes: Tensor, corners: Tensor) -> Tensor:
        """The patches at ``corners``: ``(B, N, C, *patch)``."""
        return gather_boxes(cubes, corners, self.patch)


class GridTaskViews(abc.ABC):
    """Views of a patch classification task on a 3x3x3 grid: patches at drawn corners, and their labels.

    Subclasses draw the corners and labels in :meth:`randomize`; :meth:`settings`
    checks a config block against the grid and the class count.

    Args:
        cube: spatial size of the cubes.
        patch: patch size.
        jitter: random place of each patch inside its cell (False: centred, for evaluation).
    """

    grid: ClassVar[Size3] = (3, 3, 3)
    n_classes: ClassVar[int]

    def __init__(self, cube: Sequence[int], patch: Sequence[int], jitter: bool = True) -> None:
        self.cut = GridCut(cube, self.grid, patch, jitter)

    @classmethod
    def settings(cls, block: Mapping[str, Any], cube: Sequence[int], width: float, key: str) -> PatchTaskConfig:
        """The task's settings from a config block (errors name ``key``)."""
        return PatchTaskConfig.from_config(block, cube, cls.grid, width, cls.n_classes, key)

    @abc.abstractmethod
    def randomize(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Patch corners ``(batch, N, 3)`` in input order and labels ``(batch,)``."""

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(patches (B, N, C, *patch), labels (B,))``."""
        corners, labels = self.randomize(cubes.shape[0], generator)
        return self.cut(cubes, corners), labels


class PatchEmbedding(nn.Module):
    """Flattened deepest encoder map of each patch → one shared linear layer: ``(B, N, dim)``.

    Why shared and linear: the patch methods concatenate per-patch codes; a
    projection keeps the concatenation (27 codes for Jigsaw) a few hundred wide
    instead of 27 x 512 x 8 at full width. CPC's Dense(code_size) is this layer.

    Args:
        channels: channels of the deepest encoder map (``unet.encoder_channels[-1]``).
        patch: patch size fed to the encoder.
        dim: output width per patch.
    """

    def __init__(self, channels: int, patch: Sequence[int], dim: int) -> None:
        super().__init__()
        d = deepest_size(patch)
        self.in_features = channels * d[0] * d[1] * d[2]
        self.linear = nn.Linear(self.in_features, dim)

    def forward(self, features: Sequence[Tensor], n_patches: int) -> Tensor:
        deepest = features[-1]
        return self.linear(deepest.reshape(-1, n_patches, self.in_features))


def encode_patches(unet: nn.Module, patches: Tensor) -> list[Tensor]:
    """The encoder's feature list for ``(B, N, C, *patch)`` patches, run as one batch of ``B·N``."""
    return unet.encode(patches.flatten(0, 1))


@dataclass(frozen=True)
class PatchTaskConfig:
    """Settings of a patch classification task (3D-RPL, 3D-Jig); widths are full-width, scaled by the U-Net's.

    Args:
        patch: patch size (multiples of 8; 16x16x8 fits a 3x3x3 grid on 64x64x32).
        jitter: random place of each patch inside its cell.
        embed: per-patch code width.
        hidden: hidden widths of the classifier (the paper's ``big_fully``).
        dropout: dropout of the classifier.
    """

    patch: tuple[int, ...] = (16, 16, 8)
    jitter: bool = True
    embed: int = 256
    hidden: tuple[int, ...] = (2048, 1024)
    dropout: float = 0.5

    @classmethod
    def from_config(cls, block: Mapping[str, Any], cube: Sequence[int], grid: Sequence[int], width: float,
                    n_classes: int, key: str) -> PatchTaskConfig:
        """Read and check a config block; errors name ``key`` (e.g. ``pretrain.methods.rpl``)."""
        cfg = read_block(cls, block, key)
        check_patch(cfg.patch, cube, grid, f"{key}.patch")
        check_head(cfg.hidden, width, n_classes, f"{key}.hidden")
        return cfg


class MLPHead(nn.Module):
    """Taleb et al.'s ``big_fully`` classifier: (Linear-BN-ReLU-Dropout) per hidden width, then Linear to logits.

    Args:
        in_features: input width.
        hidden: hidden widths (the paper's 2048, 1024, already scaled by the U-Net width).
        n_classes: number of logits.
        dropout: dropout after each hidden layer.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], n_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_features
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))


class PatchClassifier(nn.Module):
    """Shared code of each patch, the codes concatenated in input order → ``big_fully`` MLP → logits.

    Args:
        channels: channels of the deepest encoder map.
        patch: patch size.
        n_patches: patches per sample.
        n_classes: number of logits.
        embed: per-patch code width (scaled).
        hidden: hidden widths (scaled).
        dropout: dropout of the MLP.
    """

    def __init__(self, channels: int, patch: Sequence[int], n_patches: int, n_classes: int, embed: int,
                 hidden: Sequence[int], dropout: float = 0.5) -> None:
        super().__init__()
        self.n_patches = n_patches
        self.embedding = PatchEmbedding(channels, patch, embed)
        self.mlp = MLPHead(n_patches * embed, hidden, n_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits ``(B, n_classes)`` from the encoder features of the ``B·n_patches`` patches."""
        return self.mlp(self.embedding(features, self.n_patches))


class PretextNet(nn.Module):
    """The shared U-Net's encoder and a pretext head as one module: views ``(B, N, C, *size)`` → head outputs.

    Why one module: ``DistributedDataParallel`` synchronises the gradients of
    what runs through the wrapped module's ``forward``, encoder and head alike.
    """

    def __init__(self, unet: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.head = head

    def forward(self, views: Tensor) -> Any:
        return self.head(encode_patches(self.unet, views))


def check_head(hidden: Sequence[int], width: float, n_classes: int, key: str) -> list[int]:
    """Hidden widths scaled by ``width``; a ``ValueError`` naming ``key`` when one is narrower than the logits.

    Why: a bottleneck narrower than the number of classes cannot separate them,
    which happens when a tiny ``pretrain.width`` scales the paper's 2048/1024 down.
    """
    out = [scaled(int(h), width) for h in hidden]
    if not out or min(out) < n_classes:
        raise SettingError(key, f"hidden widths {list(hidden)} scaled by pretrain.width={width} give {out}, "
                                f"narrower than the {n_classes} classes of the head")
    return out


def classification_terms(logits: Tensor, labels: Tensor, name: str) -> dict[str, Tensor]:
    """Softmax cross-entropy (``loss_<name>``) and accuracy (``acc_<name>``) of a pretext classifier."""
    loss, acc = losses.classification(logits, labels)
    return {f"loss_{name}": loss, f"acc_{name}": acc}
