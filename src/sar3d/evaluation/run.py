"""Test-set evaluation of one fine-tuned model: Dice and HD95 per (test case, class).

Inference is MONAI's ``sliding_window_inference`` over the whole preprocessed
volume (roi = ``finetune.patch_size``, ``evaluate.sw_batch_size``,
``evaluate.overlap``, Gaussian blending); a voxel belongs to a class when the
sigmoid of its logit exceeds 0.5. Each class is its own channel (multi-label:
pancreas ``organ`` = labels {1, 2}, ``tumour`` = {2}), as in fine-tuning.

Metrics and their empty-mask conventions are in :mod:`sar3d.metrics`: Dice is
NaN when both masks are empty (excluded from means, counted ``n_empty/<class>``)
and 0 when one is; ``hd95_mm`` (voxel spacing respected) is NaN when either is
empty, and ``hd95_undefined`` flags the rows where exactly one is
(``n_hd95_undefined/<class>``).

``volume_mm3`` is the reference volume of that class from the task manifest
(measured on the original grid by normalisation). For tasks with
``size_buckets_mm3`` every row of a case carries the case's bucket, decided by
the *first* class's volume with :func:`sar3d.data.splits.size_bucket` and the
thresholds the fold's split file records (for ``auto`` the split computed them,
:mod:`sar3d.data.splits`); the rule text
(e.g. ``small < 4000 mm3 <= medium < 16000 mm3 <= large``), the summary and the
evaluation's MLflow run id go to a sidecar ``<out without .csv>.json``.

With a ``predictions`` folder, the predicted masks of the first
``evaluate.save_predictions`` test cases are written there as
``{case}.nii.gz`` (uint8, bit ``c`` set where class ``c`` is predicted, in the
config's class order) for the qualitative figure.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sar3d.data.splits import AUTO, bucket_rule, size_bucket
from sar3d.data.tasks import fold_cases, load_case, read_manifest
from sar3d.finetuning.model import build_segmenter, predict_logits
from sar3d.io import (
    InputDataError,
    atomic_output,
    read_json,
    save_volume,
    write_json,
)
from sar3d.metrics import dice_score, hd95_mm, hd95_undefined
from sar3d.training import devices, metering

__all__ = ["CSV_COLUMNS", "OPTIONAL_COLUMNS", "run_evaluate", "sidecar_path"]

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "task", "init", "ratio", "fold", "case", "class", "dice", "hd95_mm", "hd95_undefined", "volume_mm3", "size_bucket",
]
# Added after the first studies were run: readers accept files without them.
OPTIONAL_COLUMNS = ("hd95_mm", "hd95_undefined")


def fold_size_buckets(config: Mapping[str, Any], task: str, split: Path) -> list[float] | None:
    """The size-bucket thresholds a fold is evaluated with: those its split file records.

    ``auto`` thresholds exist only there (the split computes them); explicit ones
    must agree with the config, so a stale split cannot bucket silently by old numbers.
    """
    setting = config["tasks"][task].get("size_buckets_mm3")
    if not setting:
        return None
    recorded = read_json(split).get("size_buckets_mm3")
    if recorded is None and setting == AUTO:
        raise InputDataError(split, "no size_buckets_mm3 although the task's are 'auto': rerun `sar3d split`")
    if recorded is None:
        return [float(t) for t in setting]
    if setting != AUTO and [float(t) for t in setting] != [float(t) for t in recorded]:
        raise InputDataError(
            split, f"size_buckets_mm3 {recorded} differ from the config's {setting}: rerun `sar3d split`"
        )
    return [float(t) for t in recorded]


# --------------------------------------------------------------------------- the stage


def prediction_code(pred: torch.Tensor) -> np.ndarray:
    """``(C, X, Y, Z)`` boolean masks -> one uint8 volume with bit ``c`` set where class ``c`` is predicted."""
    weights = (2 ** torch.arange(len(pred), dtype=torch.int32)).view(-1, *([1] * (pred.ndim - 1)))
    return (pred.to(torch.int32) * weights).sum(0).numpy().astype(np.uint8)


def evaluate_cases(
    config: Mapping[str, Any], task: str, model: torch.nn.Module, data: Path,
    manifest: Mapping[str, Mapping[str, Any]], cases: Sequence[str], device: torch.device,
    amp: torch.dtype | None, predictions: Path | None = None, thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``case, class, dice, hd95_mm, hd95_undefined, volume_mm3, size_bucket`` for every test case and class.

    Args:
        predictions: folder for the predicted masks of the first ``evaluate.save_predictions`` cases.
        thresholds: size-bucket thresholds of the first class (:func:`fold_size_buckets`); None: no buckets.
    """
    classes = config["tasks"][task]["classes"]
    first = next(iter(classes))
    n_save = config["evaluate"]["save_predictions"] if predictions is not None else 0
    rows = []
    model.eval()
    for index, case in enumerate(metering.progress(cases, len(cases), f"evaluate {task}")):
        item = load_case(data, manifest[case], classes)
        pred = torch.sigmoid(predict_logits(model, item["image"], config, device, amp)) > 0.5
        ref = torch.as_tensor(item["label"]).bool()
        if index < n_save:
            save_volume(Path(predictions) / f"{case}.nii.gz", prediction_code(pred), item["affine"], dtype=np.uint8)
        voxel_mm3 = float(np.prod(item["spacing"]))
        recorded = manifest[case].get("foreground_mm3") or {}
        volumes = {
            name: float(recorded.get(name, float(ref[c].sum()) * voxel_mm3)) for c, name in enumerate(classes)
        }
        bucket = size_bucket(volumes[first], thresholds) if thresholds else ""
        for c, name in enumerate(classes):
            rows.append({
                "case": case, "class": name, "dice": dice_score(pred[c], ref[c]),
                "hd95_mm": hd95_mm(pred[c], ref[c], item["spacing"]), "hd95_undefined": hd95_undefined(pred[c], ref[c]),
                "volume_mm3": volumes[name], "size_bucket": bucket,
            })
    return rows


def summarise(frame: pd.DataFrame) -> dict[str, float]:
    """Mean Dice and HD95 per class (and Dice per class and bucket), NaN rows excluded and counted."""
    out: dict[str, float] = {}
    for name, group in frame.groupby("class", sort=False):
        out[f"dice/{name}"] = float(group["dice"].mean())  # pandas skips NaN
        out[f"hd95_mm/{name}"] = float(group["hd95_mm"].mean())
        out[f"n_cases/{name}"] = float(len(group))
        out[f"n_empty/{name}"] = float(group["dice"].isna().sum())
        out[f"n_hd95_undefined/{name}"] = float(group["hd95_undefined"].astype(bool).sum())
        for bucket, sub in group[group["size_bucket"] != ""].groupby("size_bucket"):
            out[f"dice/{name}/{bucket}"] = float(sub["dice"].mean())
            out[f"n_cases/{name}/{bucket}"] = float(len(sub))
    return out


def sidecar_path(csv: Path) -> Path:
    """The JSON summary of an evaluation CSV (``paths.EVALUATION_SUMMARY``): ``fold0.csv`` -> ``fold0.json``."""
    return Path(csv).with_suffix(".json")


def run_evaluate(
    config: dict[str, Any], task: str, init: str, ratio: float, fold: int, split: Path, data: Path,
    model: Path, out: Path, predictions: Path | None = None,
) -> None:
    """Evaluate one fine-tuned model on its split's test cases; write the per-(case, class) CSV.

    ``predictions``: a folder (written atomically) for the first test cases' predicted masks.
    """
    from sar3d.nets.weights import load_state_dict_file
    from sar3d.tracking import tracked_run

    fcfg = config["finetune"]
    device = devices.resolve_device(fcfg["device"])
    devices.set_determinism(device)
    amp = devices.resolve_precision(fcfg["precision"], device)
    manifest = read_manifest(data)
    cases = fold_cases(split, manifest, "test")
    net = build_segmenter(config, task)
    net.load_state_dict(load_state_dict_file(model), strict=True)
    net = devices.prepare_model(net, device, fcfg["memory_format"])
    thresholds = fold_size_buckets(config, task, split)

    identity = {"task": task, "init": init, "ratio": ratio, "fold": fold}
    params = {"evaluate": config["evaluate"], "finetune.patch_size": fcfg["patch_size"], "model": str(model),
              "size_buckets_mm3": thresholds}
    with tracked_run(config, "evaluate", identity, params=params) as run, contextlib.ExitStack() as stack:
        pred_dir = stack.enter_context(atomic_output(predictions, directory=True)) if predictions else None
        rows = evaluate_cases(config, task, net, data, manifest, cases, device, amp, pred_dir, thresholds)
        frame = pd.DataFrame([{"task": task, "init": init, "ratio": ratio, "fold": fold, **r} for r in rows])
        frame = frame.reindex(columns=CSV_COLUMNS)
        summary = summarise(frame)
        with atomic_output(out) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6f")
        side = sidecar_path(out)
        write_json(side, {
            **identity, "n_cases": len(cases),
            "size_buckets_mm3": thresholds, "bucket_rule": bucket_rule(thresholds) if thresholds else None,
            "bucket_class": next(iter(config["tasks"][task]["classes"])) if thresholds else None,
            "dice_conventions": "both empty -> NaN (excluded from means, counted); one empty -> 0",
            "hd95_conventions": "mm, symmetric 95th percentile (MONAI); either empty -> NaN; "
                                "exactly one empty flagged hd95_undefined",
            "mlflow_run_id": run.run_id,
            "summary": summary,
        })
        run.metrics({k: v for k, v in summary.items() if math.isfinite(v)})
        run.artifact(out)
        run.artifact(side)
