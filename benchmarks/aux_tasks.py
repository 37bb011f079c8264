"""Do SAR's auxiliary tasks learn? Per-epoch scale-head and discriminator accuracy of short SAR runs.

Runs the real SAR training step (``sar3d.pretraining.run.train_step``) on the default
study's cubes, once per variant of the pre-training config, and prints the mean
training accuracy of the scale head and the discriminator per epoch. Used to
find (docs/deviations.md, "SAR's auxiliary tasks") that the paper's learning
rates keep the scale head at the class prior at demo scale.

    snakemake --cores 2 results/cubes/luna16 results/cubes/lits results/cubes/brats results/cubes/heart
    python benchmarks/aux_tasks.py [--epochs 5] [--steps 10] [--variants demo paper_lr ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar3d import paths
from sar3d.config import load_config
from sar3d.data.loader import make_pretrain_loader, open_cube_store
from sar3d.pretraining import registry
from sar3d.pretraining.run import Trainer
from sar3d.pretraining.streams import move_batch
from sar3d.seeding import torch_generator

REPO = Path(__file__).resolve().parents[1]
NO_ADV = {"methods": {"sar": {"loss_weights": {"adversarial": 0.0}}}}
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": NO_ADV,  # config.yaml as shipped, encoder's adversarial term off
    "demo_adv": {},  # config.yaml as shipped: the full game
    "lr_0.1": {"optimizer": {"lr": 0.1}, "methods": {"sar": {"loss_weights": {"adversarial": 0.0},
                                                             "lr": {"scale_head": 0.1}}}},
    "corrupted_view": {"methods": {"sar": {"loss_weights": {"adversarial": 0.0}, "aux_view": "corrupted"}}},
    # the paper's discriminator optimiser (SGD 1e-3) instead of the demo's Adam 1e-3
    "disc_sgd": {"methods": {"sar": {"loss_weights": {"adversarial": 0.0}, "discriminator_optimizer": "sgd"}}},
}


def run_variant(name: str, overrides: dict[str, Any], cubes: list[Path], epochs: int, steps: int) -> list[dict]:
    config = load_config(REPO / "config.yaml", {"pretrain": overrides})
    device = torch.device("cpu")
    method = registry.build(config, "sar", device)
    trainer = Trainer.single(method)
    pcfg = config["pretrain"]
    store = open_cube_store(cubes, "train")
    rows = []
    for epoch in range(epochs):
        metrics = []
        for step, batch in enumerate(make_pretrain_loader(store, pcfg["batch_size"], 1, epoch, steps)):
            views = move_batch(method.make_views(batch, torch_generator(1, "bench", epoch, step)), device)
            metrics.append({k: float(v) for k, v in trainer.train_step(views).items()})
        row = {"variant": name, "epoch": epoch,
               **{k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}}
        rows.append(row)
        print(f"{name:15s} epoch {epoch}: acc_scale {row['acc_scale']:.3f}  loss_scale {row['loss_scale']:.3f}  "
              f"acc_disc {row['acc_disc']:.3f}  loss_res {row['loss_res']:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = load_config(REPO / "config.yaml")["pretrain"]["datasets"]
    cubes = [paths.fill(paths.CUBES, args.results, dataset=d) for d in datasets]
    rows = [r for v in args.variants for r in run_variant(v, VARIANTS[v], cubes, args.epochs, args.steps)]
    out = REPO / "benchmarks" / "out" / "aux_tasks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
