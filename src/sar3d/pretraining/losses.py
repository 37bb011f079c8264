"""Loss terms more than one pre-training method computes, as pure functions of tensors.

Every function computes in float32 whatever autocast produced, so bf16/fp16 runs
lose no precision in the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def restoration(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxel-wise MSE of a restoration against the clean cube (Models Genesis)."""
    return F.mse_loss(restored.float(), target.float())


def classification(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of class logits and the accuracy of their argmax (detached)."""
    logits = logits.float()
    return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).float().mean().detach()


def binary_logit_terms(
    net: nn.Module, features: list[torch.Tensor], labels: torch.Tensor, flip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE-with-logits of ``net(features)`` against 0/1 ``labels`` (``flip``: ``1 - labels``), and the logits."""
    logits = net(features).float().reshape(-1)
    target = labels.float()
    return F.binary_cross_entropy_with_logits(logits, 1.0 - target if flip else target), logits


def binary_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How often a logit's sign names the 0/1 label right (detached)."""
    return ((logits.detach() > 0).long() == labels).float().mean()
