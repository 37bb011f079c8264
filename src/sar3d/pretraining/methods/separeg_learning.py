"""SepaReg's learning parts, apart from the training loop: heads, losses, the seeded k-means and the steps.

Why apart: :mod:`.separeg` (the registered method) wires these into the run
loop's phases; here they are plain modules and pure functions a test can call
one by one: the projector/predictor heads of a SimSiam branch, the negative
cosine and SimSiam losses, region embeddings, the seeded k-means into
pseudo-organs, the experts, and the SimSiam and distillation steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

from sar3d.nets.unet import batch_statistics

__all__ = [
    "PredictionHead",
    "ProjectionHead",
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
