"""SepaReg's view augmentations for 3D regions, one class each (``randomize()`` apart from ``__call__``).

Grey volumes have no saturation, hue or grey-scale conversion, so torchvision's colour jitter becomes
brightness and contrast; blur and the random resized crop are 3D (docs/deviations.md, "VectorPOSE and SepaReg").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand((n,), generator=generator, device=generator.device)


class RandomResizedCrop3d:
    """A random sub-box of each crop, resized back to the crop's size (trilinear).

    Args:
        side_range: each side of the sub-box as a uniform fraction of the crop's side.
    """

    def __init__(self, side_range: tuple[float, float] = (0.5, 1.0)) -> None:
        self.side_range = side_range

    def randomize(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        low, high = self.side_range
        sides = low + (high - low) * torch.rand((n, 3), generator=generator, device=generator.device)
        centres = (1.0 - sides) * (2.0 * torch.rand((n, 3), generator=generator, device=generator.device) - 1.0)
        return sides, centres

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        sides, centres = self.randomize(x.shape[0], generator)
        theta = torch.zeros((x.shape[0], 3, 4), dtype=x.dtype, device=x.device)
        # affine_grid's coordinates run over the axes in reverse order (last axis first)
        theta[:, [0, 1, 2], [0, 1, 2]] = sides.flip(1).to(x.dtype)
        theta[:, :, 3] = centres.flip(1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomIntensityJitter:
    """Brightness and contrast jitter of a grey crop (the released ColorJitter(0.8, 0.8) with p 0.3).

    Args:
        brightness: factor drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: factor drawn from ``[1 - contrast, 1 + contrast]`` about the crop's mean.
        prob: probability per crop.
    """

    def __init__(self, brightness: float = 0.8, contrast: float = 0.8, prob: float = 0.3) -> None:
        self.brightness = brightness
        self.contrast = contrast
        self.prob = prob

    def randomize(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        apply = torch.rand((n,), generator=generator, device=generator.device) < self.prob
        return (apply, _uniform(n, 1 - self.brightness, 1 + self.brightness, generator),
                _uniform(n, 1 - self.contrast, 1 + self.contrast, generator))

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        apply, bright, contrast = (v.view(-1, 1, 1, 1, 1) for v in self.randomize(x.shape[0], generator))
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        jittered = ((x * bright - mean * bright) * contrast + mean * bright).clamp(0.0, 1.0)
        return torch.where(apply, jittered.to(x.dtype), x)


class RandomGaussianBlur3d:
    """Separable Gaussian blur with a per-crop sigma (the released GaussianBlur(3, σ 1-2) with p 0.2).

    Args:
        sigma_range: sigma in voxels, uniform.
        kernel_size: odd kernel side.
        prob: probability per crop.
    """

    def __init__(self, sigma_range: tuple[float, float] = (1.0, 2.0), kernel_size: int = 3,
                 prob: float = 0.2) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.sigma_range = sigma_range
        self.kernel_size = kernel_size
        self.prob = prob

    def randomize(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        apply = torch.rand((n,), generator=generator, device=generator.device) < self.prob
        return apply, _uniform(n, *self.sigma_range, generator)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        apply, sigma = self.randomize(x.shape[0], generator)
        n, c = x.shape[:2]
        half = self.kernel_size // 2
        offsets = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
        kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None].to(x.dtype)) ** 2)
        kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per (crop, channel)
        out = x.reshape(1, n * c, *x.shape[2:])
        for axis in range(3):
            shape = [n * c, 1, 1, 1, 1]
            shape[2 + axis] = self.kernel_size
            padding = [0, 0, 0]
            padding[axis] = half
            out = F.conv3d(F.pad(out, _pad_last3(padding), mode="replicate"), kernels.view(shape), groups=n * c)
        return torch.where(apply.view(-1, 1, 1, 1, 1), out.reshape(x.shape), x)


def _pad_last3(padding: Sequence[int]) -> list[int]:
    """``F.pad`` order (last axis first, both sides) for per-axis paddings of the last three axes."""
    return [p for size in reversed(padding) for p in (size, size)]


class RegionViews:
    """Two independently augmented views of each region crop (B, 1, X, Y, Z) in [0, 1].

    Args:
        crop: the random resized crop.
        jitter: the intensity jitter.
        blur: the Gaussian blur.
    """

    def __init__(self, crop: RandomResizedCrop3d | None = None, jitter: RandomIntensityJitter | None = None,
                 blur: RandomGaussianBlur3d | None = None) -> None:
        self.transforms = (crop or RandomResizedCrop3d(), jitter or RandomIntensityJitter(),
                           blur or RandomGaussianBlur3d())

    def view(self, crops: Tensor, generator: torch.Generator) -> Tensor:
        out = crops
        for transform in self.transforms:
            out = transform(out, generator)
        return out

    def __call__(self, crops: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.view(crops, generator), self.view(crops, generator)
