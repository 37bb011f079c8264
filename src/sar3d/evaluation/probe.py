"""A linear probe: how much of a segmentation a frozen network's features already hold.

Why: fine-tuning Dice mixes representation quality with optimisation noise. A
1x1x1 convolution (one weight per feature channel, one bias) trained on the
frozen last decoder level of an initialisation, with the same few labelled
voxels for every init, scores the features alone; a randomly initialised
network is its floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.metrics import dice_score
from sar3d.nets.unet import UNet3D, batch_statistics

__all__ = ["fit_linear_probe", "probe_dice", "probe_features"]


@torch.no_grad()
def probe_features(net: UNet3D, images: Tensor) -> Tensor:
    """The frozen last decoder level ``(N, C, X, Y, Z)`` of ``images`` ``(N, 1, X, Y, Z)``.

    Normalised with each batch's own statistics (as in pre-training), so a
    network's running BN statistics, which a random init never filled, do not
    decide its score.
    """
    with batch_statistics(net):
        return net.decode_features(net.encode(images))


def fit_linear_probe(features: Tensor, target: Tensor, steps: int = 200, lr: float = 0.05,
                     seed: int = 0) -> nn.Conv3d:
    """Train a 1x1x1 convolution on frozen features to predict a binary mask.

    Args:
        features: ``(N, C, X, Y, Z)`` frozen features of the labelled cases.
        target: ``(N, 1, X, Y, Z)`` or ``(N, X, Y, Z)`` binary mask of the same cases.
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        seed: seeds the probe's initial weights.

    The loss is BCE weighted by the class balance (foreground voxels are rare), so
    a probe that predicts "background" everywhere is not a minimum.
    """
    target = target.reshape(features.shape[0], 1, *features.shape[2:]).float()
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Conv3d(features.shape[1], 1, kernel_size=1)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=generator)
        probe.bias.zero_()
    # standardise channels on the training features: Adam then sees comparable scales
    mean = features.mean(dim=(0, 2, 3, 4), keepdim=True)
    std = features.std(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    x = (features - mean) / std
    positives = float(target.sum())
    pos_weight = torch.tensor((target.numel() - positives) / max(positives, 1.0))
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(probe(x), target, pos_weight=pos_weight).backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the probe: it takes raw features
        weight = probe.weight / std.reshape(1, -1, 1, 1, 1)
        probe.bias -= (weight * mean.reshape(1, -1, 1, 1, 1)).sum()
        probe.weight.copy_(weight)
    return probe


@torch.no_grad()
def probe_dice(probe: nn.Conv3d, features: Tensor, target: Tensor) -> list[float]:
    """Dice per case of the probe's mask (logit > 0) against ``target`` (NaN where both are empty)."""
    predicted = probe(features) > 0
    target = target.reshape(predicted.shape).bool()
    return [dice_score(p, t) for p, t in zip(predicted, target, strict=True)]
