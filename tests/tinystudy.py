"""A tiny study config that runs end to end in about a minute on CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_study(results_dir: Path) -> dict[str, Any]:
    """The default study shrunk: fewer/smaller cases, a narrow U-Net, a few steps."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["results_dir"] = str(results_dir)
    config["tracking"] = {"uri": None, "experiment": "sar3d-tests"}
    # one CT and one MRI pre-training dataset are enough to exercise every SAR term
    for name in ("lits", "heart"):
        del config["datasets"][name]
        del config["pretrain"]["datasets"][name]
    n_cases = {"luna16": 2, "brats": 6, "pancreas": 4}
    for name, n in n_cases.items():
        config["datasets"][name]["n_cases"] = n
    config["preprocess"]["spacing"] = [2.0, 2.0, 2.0]
    config["cubes"].update(size=[32, 32, 16], per_volume=4)
    config["pretrain"].update(width=0.125, batch_size=4, epochs=2, steps_per_epoch=2, val_steps=1)
    config["tasks"]["brain_tumour"]["split"]["n"] = 1
    config["tasks"]["pancreas"]["split"]["n"] = 2
    config["finetune"].update(patch_size=[32, 32, 16], epochs=2, steps_per_epoch=2, batch_size=2)
    config["resources"] = {group: {"threads": 1} for group in ("pretrain", "finetune", "evaluate")}
    return config


def unit_config(store: Path, experiment: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The default study validated with ``overrides``, its results and MLflow store under ``store``."""
    from sar3d.config import load_config

    base = {
        "results_dir": str(store / "results"),
        "tracking": {"uri": f"sqlite:///{store}/mlflow.db", "experiment": experiment},
    }
    return load_config(REPO / "config.yaml", {**base, **overrides})
