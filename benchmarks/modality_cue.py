"""How well can a single cube's modality be told at all? The ceiling for SAR's discriminator.

A logistic regression on the 16-bin intensity histogram of each cube, fitted
(full batch, L-BFGS, both modalities weighted equally) on the training cubes of the default study and scored on
the validation cubes, which come from other volumes, as balanced accuracy. The histogram is the
modality's plainest cue once every volume is scaled to [0, 1] per volume; the
score bounds what a discriminator that has to read modality from one cube can
reach on these data (docs/deviations.md, "The discriminator: learning, but not almost perfectly").

    snakemake --cores 2 results/cubes/luna16 results/cubes/lits results/cubes/brats results/cubes/heart
    python benchmarks/modality_cue.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sar3d import paths
from sar3d.config import load_config
from sar3d.data.loader import open_cube_store

REPO = Path(__file__).resolve().parents[1]
BINS = 16


def histograms(dirs: list[Path], split: str, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cube intensity histograms (N, BINS), as shares of the cube, and modality labels (N,)."""
    store = open_cube_store(dirs, split)
    rows, labels = [], []
    for start in range(0, len(store), chunk):
        batch = store.fetch(np.arange(start, min(start + chunk, len(store))))
        cubes = batch["cube"].flatten(1).clamp(0, 1)
        bins = (cubes * BINS).long().clamp(max=BINS - 1) + BINS * torch.arange(len(cubes))[:, None]
        counts = torch.bincount(bins.flatten(), minlength=BINS * len(cubes)).view(len(cubes), BINS)
        rows.append(counts.float() / cubes.shape[1])
        labels.append(batch["modality"])
    return torch.cat(rows), torch.cat(labels).float()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> torch.nn.Linear:
    """Full-batch L2-regularised logistic regression, classes weighted equally (MRI cubes outnumber CT's)."""
    model = torch.nn.Linear(x.shape[1], 1)
    weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y, weight=weight)
        loss = loss + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def balanced_accuracy(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of the CT and the MRI recall: 0.5 is chance whatever the mix."""
    with torch.no_grad():
        hit = ((model(x).squeeze(1) > 0).float() == y).float()
    return float((hit[y > 0].mean() + hit[y == 0].mean()) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "results")
    args = parser.parse_args()
    datasets = load_config(REPO / "config.yaml")["pretrain"]["datasets"]
    dirs = [paths.fill(paths.CUBES, args.results, dataset=d) for d in datasets]
    x_train, y_train = histograms(dirs, "train")
    x_val, y_val = histograms(dirs, "val")
    model = fit_logistic(x_train, y_train)
    print(f"modality from a cube's histogram, balanced accuracy: train {balanced_accuracy(model, x_train, y_train):.3f}"
          f" ({len(y_train)} cubes), validation volumes {balanced_accuracy(model, x_val, y_val):.3f}"
          f" ({len(y_val)} cubes)")


if __name__ == "__main__":
    main()
