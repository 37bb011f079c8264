"""VectorPOSE (Zhang et al., arXiv 2211.08533): Vector Prediction + Boundary-Focused Reconstruction.

Why: the crop's position, scale and orientation inside its volume are free
labels; predicting the vectors from 9 points of the crop to the volume's centre
makes the encoder spatially aware, and reconstructing a boundary map next to the
image keeps the decoder's local detail. Everything follows the released
pre-paper code (shared/specs/ssl-methods.md section 2) on the Models Genesis
U-Net; the adaptations are listed in docs/deviations.md ("VectorPOSE and SepaReg").

This module holds the Vector Prediction head, the losses and the registered
method; the view generator (crops of whole normalised volumes, their targets
and the corrupted input) is :mod:`.vectorpose_views`, the geometry
:mod:`.vectorpose_geometry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.pretraining.base import VOLUMES, Batch, PretrainMethod, Terms
from sar3d.pretraining.methods.vectorpose_geometry import N_POINTS
from sar3d.pretraining.methods.vectorpose_views import MEDIANS, VectorPoseConfig, VectorPoseViews
from sar3d.pretraining.registry import register
from sar3d.pretraining.transforms.settings import GenesisConfig

__all__ = ["VectorHead", "VectorNet", "VectorPose", "boundary_losses", "vector_losses", "wrapped_l1"]


class VectorHead(nn.Module):
    """Vector Prediction head: GAP of the three deepest encoder maps → MLP → (B, 9, 3) raw ``[r, θ, φ]``.

    The released v2 head: Dropout 0.2 → Linear(C, C/2) → BN → ReLU →
    Linear(·, hidden) → BN → ReLU → Linear(hidden, 27).

    Args:
        channels: channel counts of the three deepest encoder maps.
        hidden: width of the second layer (256 released).
        dropout: dropout before the first layer.
    """

    def __init__(self, channels: Sequence[int], hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"VectorHead takes the 3 deepest encoder maps, got channels {list(channels)}")
        total = int(sum(channels))
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(total, total // 2), nn.BatchNorm1d(total // 2), nn.ReLU(inplace=True),
            nn.Linear(total // 2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 3 * N_POINTS),
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pooled = torch.cat([torch.flatten(F.adaptive_avg_pool3d(f, 1), 1) for f in features[-3:]], dim=1)
        return self.mlp(pooled).view(-1, N_POINTS, 3)


def wrapped_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise ``min_k |pred - (target + k)|``, k in {0, 2, -2}: φ/π = 1 and -1 are one direction."""
    diff = pred - target
    return torch.minimum(diff.abs(), torch.minimum((diff - 2).abs(), (diff + 2).abs()))


def vector_losses(raw: Tensor, target: Tensor) -> dict[str, Tensor]:
    """L1 of σ(r̂) and σ(θ̂), wrap-around L1 of tanh(φ̂), each a mean over batch and points."""
    raw = raw.float()
    return {
        "loss_r": F.l1_loss(torch.sigmoid(raw[..., 0]), target[..., 0]),
        "loss_theta": F.l1_loss(torch.sigmoid(raw[..., 1]), target[..., 1]),
        "loss_phi": wrapped_l1(torch.tanh(raw[..., 2]), target[..., 2]).mean(),
    }


def boundary_losses(output: Tensor, clean: Tensor, boundary: Tensor) -> dict[str, Tensor]:
    """L1 of the two sigmoid output channels against the clean crop and its boundary map."""
    output = output.float()
    return {
        "loss_recon": F.l1_loss(output[:, 0:1], clean.float()),
        "loss_boundary": F.l1_loss(output[:, 1:2], boundary.float()),
    }


# ---------------------------------------------------------------------------------------------- the method

NUMBER = {"type": "number", "minimum": 0}


class VectorNet(nn.Module):
    """U-Net and VP head as one module, so DDP syncs both: ``(raw vectors (B, 9, 3), sigmoid output (B, 2, ...))``."""

    def __init__(self, unet: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.unet.encode(x)
        return self.head(features), self.unet.decode(features)


@register
class VectorPose(PretrainMethod):
    """VectorPOSE on the shared U-Net: crops of whole normalised volumes, VP head, 2-channel BFR output."""

    kind = "vectorpose"
    display = "VectorPOSE"
    rank = 60.0
    input = VOLUMES
    block_schema: ClassVar[dict[str, Any]] = {
        "views_per_volume": {"type": "integer", "minimum": 1, "default": 1,
                             "description": "Crops per volume in a batch (released: 9 crops x 2 volumes)."},
        "scale_range": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2,
                        "maxItems": 2, "default": [0.5, 1.5],
                        "description": "Crop extent as a uniform fraction of cubes.size voxels."},
        "min_mean": {**NUMBER, "default": 0.05, "description": "Crops darker on average are redrawn."},
        "max_tries": {"type": "integer", "minimum": 1, "default": 10, "description": "Draws per view at most."},
        "boundary_median": {
            "enum": list(MEDIANS), "default": "separable",
            "description": "Median before the boundary target's Scharr gradient: separable = 1D medians of 5 "
                           "along x, y, z in turn (~7x faster), cube = the released exact 5x5x5 median.",
        },
        "corruption": {
            "type": "object", "default": {}, "propertyNames": {"enum": [f.name for f in fields(GenesisConfig)]},
            "description": "pretrain.transforms keys over VectorPOSE's released rates (VECTORPOSE_CORRUPTION).",
        },
        "loss_weights": {
            "type": "object", "additionalProperties": False, "default": {},
            "description": "Weights of the loss terms in the minimised sum (also the validation objective).",
            "properties": {
                "vector": {**NUMBER, "default": 1.0, "description": "Weight of the VP loss (r + theta + phi)."},
                "recon": {**NUMBER, "default": 1.0, "description": "Weight of the reconstruction L1."},
                "boundary": {**NUMBER, "default": 1.0, "description": "Weight of the boundary L1."},
            },
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(name, config, device)
        block = self.block
        self.views = VectorPoseViews(VectorPoseConfig.from_config({
            "out_size": config["cubes"]["size"], "scale_range": block["scale_range"],
            "min_mean": block["min_mean"], "max_tries": block["max_tries"], "corruption": block["corruption"],
            "boundary_median": block["boundary_median"],
        }, key=f"pretrain.methods.{name}"))
        self.weights: dict[str, float] = dict(block["loss_weights"])

    def out_channels(self) -> int:
        """Two output channels: [reconstruction, boundary]."""
        return 2

    def build_heads(self) -> dict[str, Callable[[], nn.Module]]:
        channels = list(self.unet.encoder_channels)[1:]
        return {"vector_head": lambda: VectorHead(channels)}

    def network(self) -> nn.Module:
        return VectorNet(self.unet, self.heads["vector_head"])

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        groups.append({"params": list(self.heads["vector_head"].parameters()),
                       "lr": self.optimizer_settings()["lr"], "name": "vector_head"})
        return groups

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Crops of each volume with the corrupted input, both targets and the 9 vector targets."""
        volumes = [v[0].detach().cpu().numpy() for v in batch["volumes"]]
        views = self.views(volumes, self.block["views_per_volume"], generator)
        rest = {k: v for k, v in batch.items() if k not in ("volumes", "case")}
        return {**views._asdict(), **rest}

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        return net(batch["inputs"])

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        raw, output = outputs
        terms: Terms = {**vector_losses(raw, batch["vectors"]),
                        **boundary_losses(output, batch["clean"], batch["boundary"])}
        terms["loss_vector"] = terms["loss_r"] + terms["loss_theta"] + terms["loss_phi"]
        w = self.weights
        terms["objective"] = (w["vector"] * terms["loss_vector"] + w["recon"] * terms["loss_recon"]
                              + w["boundary"] * terms["loss_boundary"])
        terms["loss_total"] = terms["objective"]
        return terms["loss_total"], {k: v.detach() for k, v in terms.items()}
