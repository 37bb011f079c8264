"""SAR's auxiliary heads on the U-Net encoder: the scale head (SA) and the modality discriminator (MIAL)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModalityDiscriminator", "ScaleHead"]


class ScaleHead(nn.Module):
    """The SA module: global average pool + FC-ReLU-FC on the bottleneck ⇒ scale logits (B, n_classes)."""

    def __init__(self, in_channels: int, n_classes: int = 3, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, bottleneck: Tensor) -> Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool3d(bottleneck, 1), 1)
        return self.fc2(F.relu(self.fc1(pooled)))


def _resample_to(feature: Tensor, size: Sequence[int]) -> Tensor:
    """Bring an encoder feature to ``size``: average-pool when shrinking, trilinear when growing."""
    size = tuple(int(s) for s in size)
    if tuple(feature.shape[2:]) == size:
        return feature
    if all(f >= s for f, s in zip(feature.shape[2:], size, strict=True)):
        return F.adaptive_avg_pool3d(feature, size)
    return F.interpolate(feature, size=size, mode="trilinear", align_corners=False)


class ModalityDiscriminator(nn.Module):
    """The MIAL module: 3 strided convs + GAP + 2 FC ⇒ one logit per sample (positive = MRI).

    Densely connected to the encoder, as in the paper: conv layer ``i`` sees its
    previous output concatenated with encoder level ``i`` resampled to the same
    size (layer 0 sees level 0 alone); a 4th level, when given (the bottleneck),
    is concatenated to the last conv output before pooling. Resampling is
    adaptive, so any cube size works. Instance norm by default, so a sample's
    logit does not depend on the CT/MRI make-up of its batch.
    """

    n_layers = 3

    def __init__(
        self, feature_channels: Sequence[int], width: int = 64, hidden: int = 128, norm: str = "instance"
    ) -> None:
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if not 1 <= len(feature_channels) <= self.n_layers + 1:
            raise ValueError(f"feature_channels needs 1 to {self.n_layers + 1} entries, got {feature_channels}")
        if norm not in ("instance", "batch"):
            raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")
        self.feature_channels = tuple(feature_channels)
        self.layers = nn.ModuleList()
        previous = 0
        for i in range(self.n_layers):
            extra = feature_channels[i] if i < len(feature_channels) else 0
            out = width * 2**i
            norm_layer = nn.InstanceNorm3d(out, affine=True) if norm == "instance" else nn.BatchNorm3d(out)
            self.layers.append(
                nn.Sequential(
                    nn.Conv3d(previous + extra, out, kernel_size=3, stride=2, padding=1),
                    norm_layer,
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            previous = out
        tail = feature_channels[self.n_layers] if len(feature_channels) > self.n_layers else 0
        self.fc1 = nn.Linear(previous + tail, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.feature_channels):
            raise ValueError(f"expected {len(self.feature_channels)} feature maps, got {len(features)}")
        x = features[0]
        for i, layer in enumerate(self.layers):
            if 0 < i < len(features):
                x = torch.cat((x, _resample_to(features[i], x.shape[2:])), dim=1)
            x = layer(x)
        if len(features) > self.n_layers:
            x = torch.cat((x, _resample_to(features[self.n_layers], x.shape[2:])), dim=1)
        pooled = torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)
        return self.fc2(F.leaky_relu(self.fc1(pooled), 0.2)).squeeze(1)
