"""A linear probe: how much of a segmentation a frozen network's features already hold.

Why: fine-tuning Dice mixes representation quality with optimisation noise. A
1x1x1 convolution (one weight per feature channel, one bias) trained on the
frozen features of an initialisation, with the same few labelled voxels for
every init, scores the features alone; a randomly initialised network is its
floor.

:func:`run_probe` (``sar3d probe``, one job per task, init and fold) probes
every level: the four encoder levels (``enc1`` full resolution ... ``enc4`` the
bottleneck at 1/8) and the last decoder level (``dec``), so a representation
that is lost on the way through the decoder shows as a drop from an encoder
level to ``dec``. A level below full resolution is probed at its own
resolution (the target is the mask average-pooled to it, > 0.5) and its logits
are upsampled trilinearly for Dice. The labelled cases are the fold's training
cases at the label ratio (``labelled_cases``, as fine-tuning at that ratio);
the network is the fine-tuning's starting point (``init_model``: seeded random
for ``scratch``), so the probe scores what fine-tuning starts from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.metrics import dice_score
from sar3d.nets.unet import UNet3D, batch_statistics

__all__ = [
    "CSV_COLUMNS", "LEVELS", "fit_linear_probe", "level_features", "level_logits", "level_target", "probe_dice",
    "run_probe",
]

log = logging.getLogger(__name__)

LEVELS = ("enc1", "enc2", "enc3", "enc4", "dec")
DOWNSAMPLING = 8  # three max-poolings between enc1 and enc4
CSV_COLUMNS = ["task", "init", "ratio", "fold", "class", "level", "case", "dice"]


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
    """Dice per case of the probe's mask (logit > 0, brought to ``target``'s grid by :func:`level_logits`)
    against ``target`` ``(N, 1, X, Y, Z)`` (NaN where both are empty)."""
    predicted = level_logits(probe, features, tuple(target.shape[2:])) > 0
    target = target.reshape(predicted.shape).bool()
    return [dice_score(p, t) for p, t in zip(predicted, target, strict=True)]


def _pad(x: Tensor) -> Tensor:
    """``(N, C, X, Y, Z)`` zero-padded at the far end to multiples of 8 (MONAI ``DivisiblePad``)."""
    from monai.transforms import DivisiblePad

    pad = DivisiblePad(k=DOWNSAMPLING, method="end")
    return torch.stack([pad(v).as_subclass(torch.Tensor) for v in x])  # a plain tensor, not a MetaTensor


@torch.no_grad()
def level_features(net: UNet3D, images: Tensor) -> dict[str, Tensor]:
    """Every level of :data:`LEVELS` of ``images`` ``(N, 1, X, Y, Z)``, padded to a multiple of 8.

    Normalised with each batch's own statistics (as in pre-training), so a
    network's running BN statistics, which a random init never filled, do not
    decide its score; the padding is cropped off again by :func:`level_logits`.
    """
    with batch_statistics(net):
        encoded = net.encode(_pad(images))
        decoded = net.decode_features(encoded)
    return {**{f"enc{i + 1}": f for i, f in enumerate(encoded)}, "dec": decoded}


def _factor(features: Tensor, shape: tuple[int, ...]) -> int:
    """How many voxels of the padded ``shape`` grid one voxel of ``features`` spans per axis."""
    return -(-shape[0] // DOWNSAMPLING) * DOWNSAMPLING // features.shape[2]


def level_target(mask: Tensor, features: Tensor) -> Tensor:
    """A ``(N, 1, X, Y, Z)`` mask brought to a level's grid: padded, average-pooled, > 0.5."""
    factor = _factor(features, tuple(mask.shape[2:]))
    x = _pad(mask.float())
    return (F.avg_pool3d(x, factor) > 0.5).float() if factor > 1 else x


def level_logits(probe: nn.Conv3d, features: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The probe's logits upsampled (trilinear) to the padded full grid and cropped to ``shape`` (X, Y, Z)."""
    logits = probe(features)
    factor = _factor(features, shape)
    if factor > 1:
        logits = F.interpolate(logits, scale_factor=factor, mode="trilinear", align_corners=False)
    return logits[..., : shape[0], : shape[1], : shape[2]]


def _flat(tensors: list[Tensor]) -> Tensor:
    """Cases of different sizes as one ``(1, C, V, 1, 1)`` batch (a 1x1x1 probe does not see space)."""
    return torch.cat([t.flatten(2) for t in tensors], dim=2)[..., None, None]


def run_probe(
    config: dict[str, Any], task: str, init: str, ratio: float, fold: int, split: Path, data: Path,
    pretrained: Path | None, out: Path,
) -> pd.DataFrame:
    """Probe every class of ``task`` at every level; Dice per test case to ``out`` (CSV), means to MLflow."""
    from sar3d.data.tasks import fold_cases, load_case, read_manifest
    from sar3d.finetuning.run import init_model, labelled_cases
    from sar3d.io import atomic_output
    from sar3d.seeding import derive_seed
    from sar3d.tracking import tracked_run

    pcfg = config["probe"]
    classes = config["tasks"][task]["classes"]
    manifest = read_manifest(data)
    train, _ = labelled_cases(config, task, fold, ratio, fold_cases(split, manifest, "train"),
                              fold_cases(split, manifest, "val"))
    test = fold_cases(split, manifest, "test")
    net, _ = init_model(config, task, init, fold, pretrained)
    net.eval()

    def load(cases: list[str]) -> list[tuple[dict[str, Tensor], Tensor]]:
        items = [load_case(data, manifest[c], classes) for c in cases]
        return [(level_features(net, torch.as_tensor(it["image"])[None].float()), torch.as_tensor(it["label"])[None])
                for it in items]

    labelled, tested = load(train), load(test)
    records = []
    for k, cls in enumerate(classes):
        for level in LEVELS:
            features = _flat([f[level] for f, _ in labelled])
            target = _flat([level_target(y[:, k : k + 1], f[level]) for f, y in labelled])
            probe = fit_linear_probe(features, target, steps=pcfg["steps"], lr=pcfg["lr"],
                                     seed=derive_seed(config["seed"], "probe", task, fold, cls, level))
            for case, (f, y) in zip(test, tested, strict=True):
                records.append({"task": task, "init": init, "ratio": ratio, "fold": fold, "class": cls,
                                "level": level, "case": case, "dice": probe_dice(probe, f[level], y[:, k : k + 1])[0]})
    frame = pd.DataFrame.from_records(records, columns=CSV_COLUMNS)
    identity = {"task": task, "init": init, "ratio": ratio, "fold": fold}
    with tracked_run(config, "probe", identity, params={"probe": pcfg, "n_train_cases": len(train)}) as run:
        with atomic_output(Path(out)) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6f")
        means = frame.groupby(["class", "level"])["dice"].mean()
        run.metrics({f"probe/dice_{cls}/{level}": float(v) for (cls, level), v in means.items() if v == v})
        run.artifact(Path(out))
    log.info("probe %s %s fold %d on %d labelled case(s):\n%s", task, init, fold, len(train), means.to_string())
    return frame
