"""Phantom cube shards and a small pre-training config, shared by the pre-training tests and the golden fixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sar3d.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIZE = (16, 16, 8)
WIDTH = 0.125


def _smooth_field(rng: np.random.Generator, coarse: int) -> np.ndarray:
    """Random blobs: a coarse noise grid upsampled to the cube (smoother for a larger zoom)."""
    grid = torch.as_tensor(rng.random((1, 1, coarse, coarse, max(coarse // 2, 1))), dtype=torch.float32)
    return F.interpolate(grid, size=SIZE, mode="trilinear", align_corners=False)[0, 0].numpy()


def cube_folder(root: Path, dataset: str, modality: int, n: int, seed: int) -> Path:
    """A cube shard in the architecture.md format, all three scales, 3/4 train and 1/4 val.

    Larger scales (a bigger part of the volume squeezed into the cube) carry finer
    structure, so the scale is learnable; MRI cubes are brighter than CT cubes.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    scale = np.tile([0, 1, 2, 2], n // 4)
    cubes = np.stack([_smooth_field(rng, {0: 12, 1: 6, 2: 3}[int(s)]) for s in scale]).astype(np.float32)
    cubes = np.clip(cubes * (0.6 if modality == 0 else 1.0) + (0.0 if modality == 0 else 0.2), 0, 1)
    np.save(root / "cubes.npy", cubes.astype(np.float32))
    pd.DataFrame({
        "index": np.arange(n), "case": [f"{dataset}{k // 8}" for k in range(n)], "channel": 0,
        "scale": scale, "scale_fraction": np.array([0.5, 0.25, 0.125])[scale], "modality": modality,
        "split": np.where(np.arange(n) < n * 3 // 4, "train", "val"),
        "origin_x": 0, "origin_y": 0, "origin_z": 0, "size_x": 8, "size_y": 8, "size_z": 4,
    }).to_csv(root / "meta.csv", index=False)
    (root / "manifest.json").write_text(json.dumps({
        "dataset": dataset, "modality": ["CT", "MRI"][modality], "n_cubes": n, "size": list(SIZE),
        "scales": [0.5, 0.25, 0.125], "ratio": [1, 1, 2], "excluded_cases": [],
    }))
    return root


# The blocks of the paper's methods (config/paper.yaml) as the tests run them: the tests' config has the
# demo lr 0.01 for the scale head, as before the blocks existed (then a shared setting), and the paper's
# SGD discriminator (config.yaml's demo blocks use Adam; golden.json was recorded with SGD).
DEMO_HEAD_LR = {"lr": {"scale_head": 0.01}}
PAPER_DISCRIMINATOR = {"discriminator_optimizer": "sgd"}
BLOCKS: dict[str, dict[str, Any]] = {
    "genesis": {"kind": "genesis"},
    "sa": {"kind": "sar", "adversarial": False, **DEMO_HEAD_LR},
    "mial": {"kind": "sar", "scale_loss": False, **PAPER_DISCRIMINATOR},
    "sar": {"kind": "sar", **DEMO_HEAD_LR, **PAPER_DISCRIMINATOR},
    **{f"sar_s{k}": {"kind": "sar", "scales": [1 / k], "scale_loss": False, **PAPER_DISCRIMINATOR} for k in (2, 4, 8)},
}


def make_config(root: Path, results: str = "results", **pretrain: Any) -> dict[str, Any]:
    """config.yaml at test size with every block of :data:`BLOCKS`; ``pretrain`` keys override (merged)."""
    overrides = {
        "results_dir": str(root / results),
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "pretrain-tests"},
        "cubes": {"size": list(SIZE)},
        "pretrain": {"width": WIDTH, "batch_size": 4, "epochs": 2, "steps_per_epoch": 2, "val_steps": 1,
                     "device": "cpu", "methods": BLOCKS, **pretrain},
        # the inits of BLOCKS: config.yaml's Taleb et al. blocks need cubes of 64x64x32, not 16x16x8
        "finetune": {"inits": ["scratch", "genesis", "sar"], "full_label_inits": []},
    }
    return load_config(REPO / "config.yaml", overrides)
