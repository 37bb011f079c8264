"""Figures: loss curves from a real MLflow store, qualitative overlays from saved predictions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sar3d.config import load_config
from sar3d.evaluation.run import prediction_code
from sar3d.io import save_volume, write_json
from sar3d.reporting.figures import (
    best_axial_slice,
    decode_prediction,
    loss_histories,
    plot_loss_curves,
    plot_qualitative,
)

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = tmp_path_factory.mktemp("mlflow")
    return load_config(REPO / "config.yaml", {
        "results_dir": str(store / "results"),
        "tracking": {"uri": f"sqlite:///{store}/mlflow.db", "experiment": "figure-tests"},
        "evaluate": {"save_predictions": 2},
    })


def _assert_figures(outs: list[Path]) -> None:
    for out in outs:
        assert out.stat().st_size > 1000, out
    assert outs[0].read_bytes()[:8] == PNG
    assert b"<svg" in outs[1].read_bytes()[:2000]


def test_loss_curves_from_mlflow(config, tmp_path):
    from sar3d.tracking import tracked_run

    for init, offset in [("scratch", 0.2), ("sar", 0.0)]:
        for fold in range(2):
            identity = {"task": "pancreas", "init": init, "ratio": 1.0, "fold": fold}
            with tracked_run(config, "finetune", identity, params={}) as run:
                for epoch in range(4):
                    loss = 0.9 - 0.15 * epoch + offset + 0.01 * fold
                    run.metrics({"train/loss_dice": loss + 0.5, "val/loss_dice": loss}, step=epoch)
                time.sleep(0.002)
                run.metrics({"train/loss_dice": 0.1}, step=3)  # a resumed run logs epoch 3 again: last wins
    identity = {"task": "pancreas", "init": "sar", "ratio": 0.5, "fold": 0}  # another ratio: not in Fig. 3
    with tracked_run(config, "finetune", identity, params={}) as run:
        run.metrics({"train/loss_dice": 5.0}, step=0)

    history = loss_histories(config, "pancreas")
    assert len(history) == 2 * 2 * 2 * 4  # inits x folds x metrics x epochs
    val = history[(history.metric == "val/loss_dice") & (history.init == "scratch") & (history.epoch == 1)]
    assert sorted(val["value"]) == pytest.approx([0.95, 0.96])
    train3 = history[(history.metric == "train/loss_dice") & (history.epoch == 3)]
    assert np.allclose(train3["value"], 0.1)
    assert history["value"].max() < 5.0
    other = loss_histories(config, "pancreas", 0.5)  # the curves of another label ratio are that ratio's runs
    assert other[["init", "fold", "epoch", "value"]].values.tolist() == [["sar", 0, 0, 5.0]]

    outs = [tmp_path / "loss.png", tmp_path / "loss.svg"]
    plot_loss_curves(config, "pancreas", outs)
    _assert_figures(outs)
    assert b"Scratch (n=2)" in outs[1].read_bytes() and b"no run: Genesis" in outs[1].read_bytes()
    empty = [tmp_path / "none.png", tmp_path / "none.svg"]
    plot_loss_curves(config, "brain_tumour", empty)  # no run at all: a figure that says so, not a crash
    _assert_figures(empty)


def test_prediction_code_round_trip():
    pred = torch.zeros(2, 4, 4, 3, dtype=torch.bool)
    pred[0, 1:3, 1:3, :] = True
    pred[1, 2, 2, 1] = True
    code = prediction_code(pred)
    assert code.dtype == np.uint8 and code[2, 2, 1] == 3 and code[1, 1, 0] == 1 and code[0, 0, 0] == 0
    assert np.array_equal(decode_prediction(code, 2), pred.numpy())
    mask = np.zeros((4, 4, 5), bool)
    mask[:, :, 3] = True
    mask[0, 0, 1] = True
    assert best_axial_slice(mask) == 3 and best_axial_slice(np.zeros((2, 2, 6), bool)) == 3


def test_qualitative_figure(config, tmp_path):
    classes = config["tasks"]["pancreas"]["classes"]  # organ {1, 2}, tumour {2}
    data, cases = tmp_path / "data", ["p0", "p1", "p2"]
    rng = np.random.default_rng(0)
    entries = []
    for case in cases:
        label = np.zeros((16, 16, 8), np.uint8)
        label[4:12, 4:12, 2:6] = 1
        label[6:9, 6:9, 3:5] = 2
        save_volume(data / f"images/{case}.nii.gz", rng.normal(size=label.shape).astype(np.float32), np.eye(4))
        save_volume(data / f"labels/{case}.nii.gz", label, np.eye(4), dtype=np.uint8)
        entries.append({"case": case, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz"})
    write_json(data / "manifest.json", {"cases": entries})
    write_json(tmp_path / "fold0.json", {"train": [], "val": [], "test": cases})
    predictions = {}
    for init, shift in [("scratch", 2), ("sar", 0)]:
        folder = tmp_path / init
        for case in cases[:2]:  # evaluation saved the first save_predictions = 2 cases
            pred = torch.zeros(2, 16, 16, 8, dtype=torch.bool)
            pred[0, 4 + shift:12, 4:12, 2:6] = True
            pred[1, 6:9, 6:9, 3:5] = True
            save_volume(folder / f"{case}.nii.gz", prediction_code(pred), np.eye(4), dtype=np.uint8)
        predictions[init] = folder
    predictions["genesis"] = tmp_path / "missing"  # a failed evaluation: the panel says so
    outs = [tmp_path / "q.png", tmp_path / "q.svg"]
    plot_qualitative(config, "pancreas", data, tmp_path / "fold0.json", predictions, outs)
    _assert_figures(outs)
    svg = outs[1].read_bytes()
    assert b"no prediction" in svg and b"Dice 1.00, 1.00" in svg  # sar predicts the reference exactly
    assert b"p0 z=" in svg and b"p2 z=" not in svg  # only the first save_predictions cases
    assert len(classes) == 2
