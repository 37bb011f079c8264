"""The Models Genesis 3D U-Net every pre-training method and every fine-tuning shares.

The U-Net reproduces the public Models Genesis PyTorch ``UNet3D`` module tree so
its state dict carries the same names and shapes: ``Genesis_Chest_CT.pt`` (the
baseline the paper starts from) loads with ``strict=True`` at width 1.0, and our
own pre-trained ``model.pt`` files are interchangeable with it.

Documented deviation: Models Genesis normalises with ``ContBatchNorm3d``, which
always uses batch statistics, even in eval mode. We use the standard
:class:`torch.nn.BatchNorm3d` (same parameter and buffer names), which uses the
running statistics in eval mode, so inference does not depend on batch make-up
(:func:`batch_statistics` restores the Genesis behaviour where it matters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ENCODER_PREFIXES", "Encoder", "UNet3D", "batch_statistics"]

# state-dict prefixes of the encoder (what an encoder-only method exports to fine-tuning)
ENCODER_PREFIXES = ("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512.")

_ACTIVATIONS = {"sigmoid": torch.sigmoid, "softmax": lambda x: torch.softmax(x, dim=1)}


def _scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (rounded, never below 1)."""
    return max(1, round(channels * width))


class _ConvBNReLU(nn.Module):
    """3x3x3 conv + BN + ReLU; attribute names ``conv1``/``bn1`` match Models Genesis ``LUConv``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(_ConvBNReLU(in_channels, mid_channels), _ConvBNReLU(mid_channels, out_channels))


class _Down(nn.Module):
    """One encoder level (``ops``); pooling is left to the caller so the pre-pool output is kept."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.ops = _double_conv(in_channels, mid_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


class _Up(nn.Module):
    """One decoder level: transposed conv x2, concatenation with the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _double_conv(in_channels + skip_channels, out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class _Out(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(x)


class UNet3D(nn.Module):
    """Models Genesis 3D U-Net with a channel width multiplier.

    At ``width=1`` the encoder levels are 1→32→64, 64→64→128, 128→128→256 and
    256→256→512 and the decoder levels 768→256→256, 384→128→128, 192→64→64
    (19.07 M parameters), with the Models Genesis state-dict names. Spatial
    sizes must be divisible by 8 (three 2x poolings).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        final_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if final_activation is not None and final_activation not in _ACTIVATIONS:
            raise ValueError(f"final_activation must be one of {sorted(_ACTIVATIONS)} or None")
        c = [_scaled(n, width) for n in (32, 64, 128, 256, 512)]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = width
        self.final_activation = final_activation
        self.encoder_channels: tuple[int, int, int, int] = (c[1], c[2], c[3], c[4])

        self.down_tr64 = _Down(in_channels, c[0], c[1])
        self.down_tr128 = _Down(c[1], c[1], c[2])
        self.down_tr256 = _Down(c[2], c[2], c[3])
        self.down_tr512 = _Down(c[3], c[3], c[4])
        self.up_tr256 = _Up(c[4], c[3], c[3])
        self.up_tr128 = _Up(c[3], c[2], c[2])
        self.up_tr64 = _Up(c[2], c[1], c[1])
        self.out_tr = _Out(c[1], out_channels)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The four encoder outputs before pooling, shallow to deep (the last is the bottleneck)."""
        f64 = self.down_tr64(x)
        f128 = self.down_tr128(F.max_pool3d(f64, 2))
        f256 = self.down_tr256(F.max_pool3d(f128, 2))
        f512 = self.down_tr512(F.max_pool3d(f256, 2))
        return [f64, f128, f256, f512]

    def decode_features(self, features: Sequence[Tensor]) -> Tensor:
        """The last decoder level, before the 1x1x1 output layer: what a linear probe reads."""
        if len(features) != 4:
            raise ValueError(f"decode expects the 4 encoder features, got {len(features)}")
        f64, f128, f256, f512 = features
        x = self.up_tr256(f512, f256)
        x = self.up_tr128(x, f128)
        return self.up_tr64(x, f64)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        """Decode :meth:`encode`'s output; applies the final activation when one is set."""
        x = self.out_tr(self.decode_features(features))
        if self.final_activation is not None:
            x = _ACTIVATIONS[self.final_activation](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encoder(self) -> Encoder:
        """The encoder alone, sharing this U-Net's modules (see :class:`Encoder`)."""
        return Encoder(self)


class Encoder(nn.Module):
    """A U-Net's four encoder levels as a module of their own (the same parameters, not a copy).

    Why: DDP requires every parameter of the module it wraps to get a gradient in
    each step; a pretext task that never decodes wraps this instead of the U-Net.
    """

    def __init__(self, unet: UNet3D) -> None:
        super().__init__()
        self.down_tr64, self.down_tr128 = unet.down_tr64, unet.down_tr128
        self.down_tr256, self.down_tr512 = unet.down_tr256, unet.down_tr512
        self.encoder_channels = unet.encoder_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four encoder outputs, as :meth:`UNet3D.encode`."""
        return UNet3D.encode(self, x)  # type: ignore[arg-type] - the same attributes


@contextlib.contextmanager
def batch_statistics(*models: nn.Module) -> Iterator[None]:
    """Normalise with each batch's own statistics (as Models Genesis' ``ContBatchNorm3d`` does), changing nothing.

    Why: after a few dozen steps at SGD lr 0.1-1.0 the running statistics still
    mix those of the initial weights with the current ones, so eval-mode BN feeds
    the scale head features it never saw in training (measured: validation scale
    CE 6.7, accuracy 0.25 against 1.1 and 0.46 in training). The running
    statistics and the mode are restored on exit.
    """
    norms = [m for model in models for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    try:
        for m in norms:
            m.train()
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
