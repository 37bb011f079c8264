"""Fine-tuning and evaluation on a tiny preprocessed task built here; Dice conventions by hand."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from sar3d.evaluation.run import CSV_COLUMNS, dice_score, run_evaluate, sidecar_path
from sar3d.finetuning import run as finetune
from sar3d.finetuning.run import init_model, labelled_cases, run_finetune
from sar3d.io import InputDataError, save_volume, write_json
from sar3d.nets.unet import UNet3D
from sar3d.nets.weights import load_state_dict_file
from tinystudy import unit_config

SHAPE = (24, 24, 16)  # smaller than the patch in x/y: exercises padding and sliding-window padding


@pytest.fixture
def config(store: Path) -> dict[str, Any]:
    return unit_config(
        store,
        "finetune-tests",
        {
            "pretrain": {"width": 0.125},
            "tasks": {"brain_tumour": {"size_buckets_mm3": [100, 400]}},
            "finetune": {"patch_size": [32, 32, 16], "epochs": 2, "steps_per_epoch": 2, "batch_size": 2,
                         "device": "cpu"},
            "evaluate": {"sw_batch_size": 1, "overlap": 0.25},
        },
    )


def _case(rng: np.random.Generator, radius: int, with_tumour: bool) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SHAPE, dtype=np.uint8)
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    ball = (x - 12) ** 2 + (y - 12) ** 2 + ((z - 8) * 1.5) ** 2 <= radius**2
    label[ball] = 1
    if with_tumour:
        label[ball & (x < 12)] = 2
    image = rng.normal(0, 0.2, SHAPE).astype(np.float32) + label.astype(np.float32)
    return image, label


def _task_folder(root: Path, task: str, classes: dict[str, list[int]], radii: list[int]) -> Path:
    """Preprocessed task folder (architecture.md): images/, labels/, manifest.json at 1 mm spacing."""
    rng = np.random.default_rng(0)
    entries = []
    for i, radius in enumerate(radii):
        case = f"{task}_{i:03d}"
        image, label = _case(rng, radius, with_tumour=i % 3 != 0)
        save_volume(root / f"images/{case}.nii.gz", image, np.eye(4))
        save_volume(root / f"labels/{case}.nii.gz", label, np.eye(4), dtype=np.uint8)
        volumes = {name: float(np.isin(label, values).sum()) for name, values in classes.items()}
        entries.append({"case": case, "channel": 0, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz",
                        "shape": list(SHAPE), "foreground_mm3": volumes})
    write_json(root / "manifest.json", {"purpose": "task", "dataset": task, "task": task, "modality": "CT",
                                        "spacing": [1.0, 1.0, 1.0], "cases": entries})
    cases = [e["case"] for e in entries]
    write_json(root / "fold0.json", {"task": task, "fold": 0, "kind": "kfold", "seed": 0,
                                     "train": cases[:4], "val": cases[4:5], "test": cases[5:]})
    return root


@pytest.fixture
def pancreas(tmp_path: Path, config: dict[str, Any]) -> Path:
    classes = config["tasks"]["pancreas"]["classes"]
    return _task_folder(tmp_path / "pancreas", "pancreas", classes, [5, 6, 7, 5, 6, 7, 4])


@pytest.fixture
def brain(tmp_path: Path, config: dict[str, Any]) -> Path:
    # whole-tumour volumes ~ 60 (small), ~ 250 (medium), ~ 700 (large) voxels at 1 mm
    return _task_folder(tmp_path / "brain", "brain_tumour", config["tasks"]["brain_tumour"]["classes"],
                        [5, 6, 7, 5, 6, 3, 5, 7])


def _history(config: dict[str, Any], job_key: str, metric: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name(config["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.job_key = '{job_key}'")
    assert len(runs) == 1
    return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, metric), key=lambda m: m.step)]


def test_finetune_scratch_then_evaluate(config, pancreas, tmp_path):
    out, ckpt = tmp_path / "ft" / "model.pt", tmp_path / "ft" / "checkpoint.pt"
    run_finetune(config, "pancreas", "scratch", 1.0, 0, pancreas / "fold0.json", pancreas, None, out, ckpt)
    state = torch.load(out, weights_only=True)
    UNet3D(out_channels=2, width=0.125, final_activation=None).load_state_dict(state, strict=True)
    assert torch.load(ckpt, weights_only=True)["finished"]
    key = "finetune/fold=0/init=scratch/ratio=1.0/task=pancreas"
    for metric in ["train/loss_dice", "val/loss_dice", "lr/unet", "perf/patches_per_s"]:
        assert len(_history(config, key, metric)) == 2, metric

    csv = tmp_path / "eval" / "fold0.csv"
    preds = tmp_path / "eval" / "fold0_pred"
    run_evaluate(config, "pancreas", "scratch", 1.0, 0, pancreas / "fold0.json", pancreas, out, csv, preds)
    frame = pd.read_csv(csv)
    assert list(frame.columns) == CSV_COLUMNS
    assert len(frame) == 2 * 2  # 2 test cases x 2 classes
    assert set(frame["class"]) == {"organ", "tumour"}
    assert frame["size_bucket"].isna().all()  # pancreas has no buckets
    assert ((frame["dice"].dropna() >= 0) & (frame["dice"].dropna() <= 1)).all()
    # HD95 is NaN exactly where a mask is empty; one-sided emptiness is flagged
    one_empty = (frame["dice"] == 0) & frame["hd95_undefined"]
    assert (frame["hd95_mm"].isna() == (frame["dice"].isna() | one_empty)).all()
    assert (frame["hd95_mm"].dropna() >= 0).all()
    side = json.loads(sidecar_path(csv).read_text())
    assert side["bucket_rule"] is None and side["n_cases"] == 2
    client = mlflow.MlflowClient(tracking_uri=config["tracking"]["uri"])
    assert client.get_run(side["mlflow_run_id"]).data.tags["stage"] == "evaluate"
    saved = sorted(p.name for p in preds.iterdir())  # first save_predictions (2) test cases
    assert saved == ["pancreas_005.nii.gz", "pancreas_006.nii.gz"]


def test_finetune_from_pretrained_skips_output_layer(config, pancreas, brain, tmp_path):
    torch.manual_seed(0)
    pretrained = UNet3D(out_channels=1, width=0.125)
    path = tmp_path / "pre.pt"
    torch.save(pretrained.state_dict(), path)

    model, skipped = init_model(config, "pancreas", "sar", 0, path)  # 2 classes: output layer differs
    assert skipped == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    own = model.state_dict()
    for k, v in pretrained.state_dict().items():
        assert torch.equal(own[k], v) != (k in skipped), k
    # 1 class: the shapes fit, but the restoration output layer is not reused by default ...
    model, skipped = init_model(config, "brain_tumour", "sar", 0, path)
    assert skipped == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    head = "out_tr.final_conv.weight"
    assert not torch.equal(model.state_dict()[head], pretrained.state_dict()[head])
    # ... unless asked for
    reuse = {**config, "finetune": {**config["finetune"], "transfer_output_layer": True}}
    model, skipped = init_model(reuse, "brain_tumour", "sar", 0, path)
    assert skipped == []

    out = tmp_path / "ft2" / "model.pt"
    run_finetune(config, "pancreas", "sar", 1.0, 0, pancreas / "fold0.json", pancreas, path, out,
                 tmp_path / "ft2" / "ckpt.pt")
    UNet3D(out_channels=2, width=0.125, final_activation=None).load_state_dict(load_state_dict_file(out))


def test_label_ratio_subsets_nest_and_bound_every_labelled_case(config):
    ratios = [1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
    for n_train, n_val in [(20, 5), (152, 38), (6, 2), (1, 1), (9, 3)]:
        train, val = [f"t{i}" for i in range(n_train)], [f"v{i}" for i in range(n_val)]
        subsets = {r: labelled_cases(config, "pancreas", 0, r, train, val) for r in ratios}
        assert subsets[1] == (sorted(train), sorted(val))
        for r, (t, v) in subsets.items():
            assert set(t) <= set(train) and set(v) <= set(val) and t and v
            # the ratio covers validation too: at most ceil(r N) cases plus the validation share's minimum of one
            assert len(t) + len(v) <= math.ceil(r * (n_train + n_val)) + 1, (n_train, n_val, r, len(t), len(v))
        for big, small in itertools.pairwise(ratios):
            assert set(subsets[small][0]) <= set(subsets[big][0]) and set(subsets[small][1]) <= set(subsets[big][1])
    full = {**config, "finetune": {**config["finetune"], "label_ratio_validation": "full"}}
    assert labelled_cases(full, "pancreas", 0, 0.2, train, val)[1] == sorted(val)


def test_a_ratio_run_touches_only_its_share_of_labelled_cases(config, tmp_path, monkeypatch):
    """What fine-tuning really loads: train and val subsets nested across ratios, ceil(r N) + 1 at most."""
    folder = _task_folder(tmp_path / "p", "pancreas", config["tasks"]["pancreas"]["classes"], [5, 6, 7, 5] * 3 + [4])
    cases = json.loads((folder / "fold0.json").read_text())
    split = {"task": "pancreas", "fold": 0, "kind": "kfold", "seed": 0,
             "train": cases["train"] + cases["test"][:5], "val": cases["val"] + cases["test"][5:7],
             "test": cases["test"][7:]}
    write_json(folder / "split.json", split)
    labelled = set(split["train"]) | set(split["val"])  # 9 train + 3 val
    touched: dict[float, set[str]] = {}
    load = finetune.load_case

    def recording_load(data, entry, classes):
        touched[ratio].add(entry["case"])
        return load(data, entry, classes)

    monkeypatch.setattr(finetune, "load_case", recording_load)
    fast = {**config, "finetune": {**config["finetune"], "epochs": 1, "steps_per_epoch": 1}}
    for ratio in (1.0, 0.5, 0.25):
        touched[ratio] = set()
        out = tmp_path / f"r{ratio}" / "model.pt"
        run_finetune(fast, "pancreas", "scratch", ratio, 0, folder / "split.json", folder, None, out,
                     tmp_path / f"r{ratio}" / "ckpt.pt")
        assert touched[ratio] <= labelled
        assert len(touched[ratio]) <= math.ceil(ratio * len(labelled)) + 1, (ratio, touched[ratio])
        assert touched[ratio] & set(split["val"])  # it still validates, on its own share of val cases
    assert touched[1.0] == labelled
    assert touched[0.25] <= touched[0.5] <= touched[1.0]


def test_evaluate_uses_the_splits_auto_buckets(config, brain, tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    torch.save(UNet3D(out_channels=1, width=0.125, final_activation=None).state_dict(), model)
    auto = {**config, "tasks": {**config["tasks"], "brain_tumour": {**config["tasks"]["brain_tumour"],
                                                                    "size_buckets_mm3": "auto"}}}
    with pytest.raises(InputDataError, match="rerun `sar3d split`") as err:  # a split written before auto
        run_evaluate(auto, "brain_tumour", "scratch", 1.0, 0, brain / "fold0.json", brain, model, tmp_path / "a.csv")
    assert err.value.path == brain / "fold0.json"
    split = json.loads((brain / "fold0.json").read_text())
    write_json(brain / "auto.json", {**split, "size_buckets_mm3": [150.0, 650.0]})  # as the split stage writes it
    run_evaluate(auto, "brain_tumour", "scratch", 1.0, 0, brain / "auto.json", brain, model, tmp_path / "b.csv")
    frame = pd.read_csv(tmp_path / "b.csv")
    for row in frame.itertuples():
        assert row.size_bucket == ("small" if row.volume_mm3 < 150 else "medium" if row.volume_mm3 < 650 else "large")
    assert json.loads(sidecar_path(tmp_path / "b.csv").read_text())["size_buckets_mm3"] == [150.0, 650.0]
    with pytest.raises(InputDataError, match="differ from the config"):  # explicit [100, 400] vs the split's
        run_evaluate(config, "brain_tumour", "scratch", 1.0, 0, brain / "auto.json", brain, model, tmp_path / "c.csv")


def test_evaluate_buckets(config, brain, tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    torch.save(UNet3D(out_channels=1, width=0.125, final_activation=None).state_dict(), model)
    csv = tmp_path / "brain.csv"
    run_evaluate(config, "brain_tumour", "scratch", 1.0, 0, brain / "fold0.json", brain, model, csv)
    frame = pd.read_csv(csv)
    manifest = json.loads((brain / "manifest.json").read_text())
    volumes = {c["case"]: c["foreground_mm3"]["whole_tumour"] for c in manifest["cases"]}
    assert list(frame["case"]) == ["brain_tumour_005", "brain_tumour_006", "brain_tumour_007"]
    for row in frame.itertuples():
        assert row.volume_mm3 == pytest.approx(volumes[row.case])
        expected = "small" if row.volume_mm3 < 100 else "medium" if row.volume_mm3 < 400 else "large"
        assert row.size_bucket == expected
    assert set(frame["size_bucket"]) == {"small", "medium", "large"}
    side = json.loads(sidecar_path(csv).read_text())
    assert side["bucket_rule"] == "small < 100 mm3 <= medium < 400 mm3 <= large"


def test_dice_conventions_match_monai():
    from monai.metrics import compute_dice

    empty = np.zeros((4, 4, 4), bool)
    a = empty.copy()
    a[0, 0, :4] = True  # 4 voxels
    b = empty.copy()
    b[0, 0, 2:4] = True
    b[1, 0, 0:2] = True  # 4 voxels, 2 shared with a
    assert math.isnan(dice_score(empty, empty))
    assert dice_score(a, empty) == 0.0 and dice_score(empty, a) == 0.0
    assert dice_score(a, a) == 1.0
    assert dice_score(a, b) == pytest.approx(0.5)  # 2*2 / (4+4)
    for pred, ref in [(a, a), (a, b), (b, a), (empty, a)]:
        monai = compute_dice(torch.as_tensor(pred)[None, None].float(), torch.as_tensor(ref)[None, None].float())
        assert dice_score(pred, ref) == pytest.approx(float(monai))
