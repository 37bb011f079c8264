"""The networks of SAR pre-training: Models Genesis 3D U-Net, scale head, modality discriminator.

The U-Net reproduces the public Models Genesis PyTorch ``UNet3D`` module tree so
its state dict carries the same names and shapes: ``Genesis_Chest_CT.pt`` (the
baseline the paper starts from) loads with ``strict=True`` at width 1.0, and our
own pre-trained ``model.pt`` files are interchangeable with it.

Documented deviation: Models Genesis normalises with ``ContBatchNorm3d``, which
always uses batch statistics, even in eval mode. We use the standard
:class:`torch.nn.BatchNorm3d` (same parameter and buffer names), which uses the
running statistics in eval mode, so inference does not depend on batch make-up.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.io import InputDataError

__all__ = [
    "ModalityDiscriminator",
    "ScaleHead",
    "UNet3D",
    "batch_statistics",
    "count_parameters",
    "load_state_dict_file",
    "transfer_weights",
]

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

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        """Decode :meth:`encode`'s output; applies the final activation when one is set."""
        if len(features) != 4:
            raise ValueError(f"decode expects the 4 encoder features, got {len(features)}")
        f64, f128, f256, f512 = features
        x = self.up_tr256(f512, f256)
        x = self.up_tr128(x, f128)
        x = self.up_tr64(x, f64)
        x = self.out_tr(x)
        if self.final_activation is not None:
            x = _ACTIVATIONS[self.final_activation](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


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


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` checkpoints (Models Genesis) carry."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict safely (``weights_only``), unwrapping ``{"state_dict": ...}`` and ``module.``.

    Raises :class:`~sar3d.io.InputDataError` naming the file when it is not a
    readable state dict (including pickles that ``weights_only`` refuses).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise InputDataError(path, "file does not exist") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise InputDataError(path, f"not a weights-only state dict ({type(err).__name__}: {err})") from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InputDataError(path, f"expected a non-empty state dict, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InputDataError(path, f"not a state dict: entries {bad[:5]} are not named tensors")
    return _strip_module_prefix(obj)


def transfer_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], exclude: Sequence[str] = ()
) -> list[str]:
    """Load every entry whose name and shape match ``model``; return the skipped names, sorted.

    nnU-Net-style transfer: a fine-tuning model with a different output class
    count keeps its freshly initialised ``out_tr.final_conv.*``; names starting
    with a prefix in ``exclude`` are skipped too. Raises when nothing matches,
    because that always means the wrong file or architecture.
    """
    own = model.state_dict()
    state_dict = _strip_module_prefix(state_dict)
    matched = {
        k: v for k, v in state_dict.items()
        if k in own and tuple(v.shape) == tuple(own[k].shape) and not k.startswith(tuple(exclude))
    }
    if not matched:
        raise ValueError(
            f"no entry of the state dict matches the model by name and shape "
            f"(state dict: {len(state_dict)} entries, e.g. {sorted(state_dict)[:3]}; "
            f"model: e.g. {sorted(own)[:3]})"
        )
    model.load_state_dict(matched, strict=False)
    return sorted(k for k in state_dict if k not in matched)
