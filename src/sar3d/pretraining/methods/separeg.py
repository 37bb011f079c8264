"""SepaReg in 3D (Wang et al., AAAI 2022): region-level SimSiam, then intra-/inter-organ distillation.

Why regions: pixel-level contrast treats neighbouring voxels of one map as
negatives although they share semantics; SepaReg contrasts whole structures
(supervoxels of :mod:`.separeg_regions`) instead. Then k-means on the shared
network's region embeddings gives pseudo-organs; one expert per cluster learns
its organ (intra-organ), and the student distils from its region's expert and
from the shared network (inter-organ). The released code is 2D and partial
(shared/specs/ssl-methods.md section 3); every 3D adaptation is a line of
docs/deviations.md ("VectorPOSE and SepaReg").

This module holds the parts that do not depend on the training loop: the view
augmentations (one class each), the projector/predictor heads, the losses
(pure functions), the seeded k-means and the three training steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

from sar3d.networks import batch_statistics

__all__ = [
    "PredictionHead",
    "ProjectionHead",
    "RandomGaussianBlur3d",
    "RandomIntensityJitter",
    "RandomResizedCrop3d",
    "RegionViews",
    "SiameseBranch",
    "distillation_step",
    "kmeans_clusters",
    "make_experts",
    "negative_cosine",
    "region_embeddings",
    "simsiam_loss",
    "simsiam_step",
    "teacher_loss",
]


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


class ProjectionHead(nn.Module):
    """GAP of the deepest encoder map → Linear-BN-ReLU-Linear (BYOL-style projector of the released code).

    Args:
        in_channels: channels of the deepest encoder map.
        hidden: hidden width (4096 released).
        out: projection size (256 released).
    """

    def __init__(self, in_channels: int, hidden: int = 4096, out: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, deepest: Tensor) -> Tensor:
        return self.mlp(torch.flatten(F.adaptive_avg_pool3d(deepest, 1), 1))


class PredictionHead(nn.Module):
    """SimSiam predictor: Linear-BN-ReLU-Linear on a projection.

    Args:
        dim: projection size.
        hidden: hidden width.
    """

    def __init__(self, dim: int = 256, hidden: int = 4096) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(z)


class SiameseBranch(nn.Module):
    """A U-Net encoder with its projector and predictor: one of SepaReg's networks (shared, expert, student).

    Args:
        unet: the backbone (only its encoder runs).
        hidden: projector and predictor hidden width.
        out: projection size.
    """

    def __init__(self, unet: nn.Module, hidden: int = 4096, out: int = 256) -> None:
        super().__init__()
        self.unet = unet
        self.projector = ProjectionHead(unet.encoder_channels[-1], hidden, out)
        self.predictor = PredictionHead(out, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(projection z, prediction p)`` of a batch of views."""
        z = self.projector(self.unet.encode(x)[-1])
        return z, self.predictor(z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stop-grad(z)), averaged over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric SimSiam loss: each view's prediction against the other view's projection."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def simsiam_step(branch: SiameseBranch, optimiser: torch.optim.Optimizer, view1: Tensor, view2: Tensor) -> Tensor:
    """One SimSiam update of ``branch`` on two views of the same regions; returns the detached loss."""
    z1, p1 = branch(view1)
    z2, p2 = branch(view2)
    loss = simsiam_loss(p1, p2, z1, z2)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss.detach()


@torch.no_grad()
def region_embeddings(branch: SiameseBranch, crops: Tensor, batch_size: int = 16) -> np.ndarray:
    """L2-normalised projections of region crops (eval mode; the branch's mode is restored)."""
    training = branch.training
    branch.eval()
    try:
        out = [F.normalize(branch(crops[i:i + batch_size])[0].float(), dim=1) for i in
               range(0, crops.shape[0], batch_size)]
    finally:
        branch.train(training)
    return torch.cat(out).numpy()


def kmeans_clusters(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Pseudo-organ of each region: sklearn k-means (10 seeded restarts), labels 0..k-1.

    Raises:
        ValueError: fewer regions than clusters.
    """
    if embeddings.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} region embeddings, got {embeddings.shape[0]}")
    return KMeans(n_clusters=k, n_init=10, random_state=seed % 2**32).fit_predict(embeddings).astype(np.int64)


def make_experts(shared: SiameseBranch, k: int) -> nn.ModuleList:
    """One expert per pseudo-organ, each starting as a copy of the shared network."""
    return nn.ModuleList(copy.deepcopy(shared) for _ in range(k))


def teacher_loss(teacher: SiameseBranch, s1: Tensor, s2: Tensor, view1: Tensor, view2: Tensor) -> Tensor:
    """Released distillation (type 2) from one frozen teacher: ``D(teacher.pred(student z), teacher z)``, symmetric.

    The teacher's predictor maps the student's projections ``s1``/``s2`` into its
    space; its own projections are targets (no gradient). The teacher normalises
    with batch statistics without moving its running statistics; the caller
    keeps its weights out of the optimiser.
    """
    with batch_statistics(teacher):
        with torch.no_grad():
            t1, _ = teacher(view1)
            t2, _ = teacher(view2)
        return simsiam_loss(teacher.predictor(s1), teacher.predictor(s2), t1, t2)


def distillation_step(
    student: SiameseBranch, teachers: Sequence[SiameseBranch], optimiser: torch.optim.Optimizer,
    view1: Tensor, view2: Tensor,
) -> Tensor:
    """One distillation update of ``student`` from frozen ``teachers`` (its region's expert and the shared net).

    The loss is :func:`teacher_loss` averaged over the teachers; the teachers'
    parameters get no gradient.
    """
    s1, _ = student(view1)
    s2, _ = student(view2)
    frozen = [p for teacher in teachers for p in teacher.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        loss = torch.stack([teacher_loss(t, s1, s2, view1, view2) for t in teachers]).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return loss.detach()
