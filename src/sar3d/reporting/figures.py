"""The paper's figures, as PNG and SVG (matplotlib, Agg backend: no display needed).

* :func:`plot_loss_curves` - Fig. 3: fine-tuning curves per initialisation for
  one task at one label ratio (``report.loss_curve_ratios``), read from the
  MLflow metric history of the fine-tuning runs (``train/loss_dice``,
  ``val/loss_dice`` and the first class's ``val/dice_*``, one point per epoch,
  drawn against fine-tuning steps); mean over folds with a ± std band.
* :func:`plot_label_ratios` - Table 4 as a figure: Dice vs fraction of
  annotated training cases (log x), one panel per task, mean ± std over folds.
* :func:`plot_qualitative` - for the first test cases of fold 0 (label ratio 1),
  the axial slice with the largest reference area of the first class: image,
  reference outline and each initialisation's prediction (saved by evaluation).

Missing inputs (a failed job) leave a curve/panel out and say so in the
figure, never fail the figure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sar3d import paths
from sar3d.grid import table2_inits, table4_inits
from sar3d.io import atomic_output, load_volume, read_json
from sar3d.pretraining.registry import display_name
from sar3d.reporting.labels import ratio_label

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")
QUALITATIVE_FOLD = 0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, outs: Sequence[Path]) -> None:
    """Write a figure to every path (format from the suffix), atomically, and close it."""
    for out in outs:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format=Path(out).suffix.lstrip("."), dpi=150, bbox_inches="tight")
    _pyplot().close(fig)


def figure_paths(config: Mapping[str, Any], name: str) -> list[Path]:
    return [paths.fill(paths.FIGURE, config["results_dir"], figure=name, ext=ext) for ext in FORMATS]


# --------------------------------------------------------------------------- Fig. 3: loss curves


def loss_curve_name(task: str, ratio: float) -> str:
    """Figure name of a task's fine-tuning curves at one label ratio."""
    return f"loss_curves_{task}_r{paths.ratio_tag(ratio)}"


def curve_metrics(config: Mapping[str, Any], task: str) -> list[tuple[str, str, str]]:
    """``(MLflow metric, panel title, y label)`` of each panel: the Dice losses, then the first class's Dice."""
    first = next(iter(config["tasks"][task]["classes"]))
    return [("train/loss_dice", "training loss", "Dice loss"), ("val/loss_dice", "validation loss", "Dice loss"),
            (f"val/dice_{first}", f"validation Dice ({first})", "Dice")]


def loss_histories(config: Mapping[str, Any], task: str, ratio: float = 1.0) -> pd.DataFrame:
    """Long form ``init, fold, metric, epoch, value`` of every finished fine-tuning run of a task and ratio.

    A resumed run may log an epoch twice; the last value logged for an epoch wins.
    """
    from sar3d.reporting.runs import mlflow_client, stage_runs

    client = mlflow_client(config)
    tag = paths.ratio_tag(ratio)
    records = []
    for (run_task, init, run_tag, fold), run in stage_runs(config, "finetune").items():
        if run_task != task or run_tag != tag:
            continue
        for metric, _, _ in curve_metrics(config, task):
            history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
            last = {m.step: m.value for m in history}
            records += [{"init": init, "fold": fold, "metric": metric, "epoch": e, "value": v} for e, v in last.items()]
    return pd.DataFrame.from_records(records, columns=["init", "fold", "metric", "epoch", "value"])


def plot_loss_curves(config: Mapping[str, Any], task: str, outs: Sequence[Path], ratio: float = 1.0) -> None:
    """Fig. 3 for one task and label ratio: mean ± std over folds, per init, against fine-tuning steps.

    Ratio 1 shows every init of Table 2, any other ratio those of Table 4. Each
    point is the end of an epoch (``finetune.steps_per_epoch`` steps).
    """
    plt = _pyplot()
    history = loss_histories(config, task, ratio)
    panels = curve_metrics(config, task)
    steps = config["finetune"]["steps_per_epoch"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    inits = table2_inits(config) if ratio == 1 else table4_inits(config)
    absent = [i for i in inits if i not in set(history["init"])]
    # one colour per init even past ten rows (tab10 would repeat: eleven rows in the default study)
    palette = plt.get_cmap("tab10" if len(inits) <= 10 else "tab20").colors
    for ax, (metric, title, ylabel) in zip(axes[0], panels, strict=True):
        for index, init in enumerate(inits):
            sub = history[(history["init"] == init) & (history["metric"] == metric)]
            if sub.empty:
                continue
            stats = sub.groupby("epoch")["value"].agg(["mean", "std", "count"])
            x = (stats.index + 1) * steps
            legend = f"{display_name(config, init)} (n={sub['fold'].nunique()})"
            line = ax.plot(x, stats["mean"], label=legend, color=palette[index % len(palette)], marker=".")
            ax.fill_between(x, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                            color=line[0].get_color(), alpha=0.15)
        ax.set(xlabel="fine-tuning step", ylabel=ylabel, title=f"{task}: {title}")
        ax.grid(alpha=0.3)
    drawn = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if drawn:
        drawn[-1].legend(fontsize="small")
    else:
        axes[0][0].text(0.5, 0.5, "no finished fine-tuning run", ha="center", transform=axes[0][0].transAxes)
    if absent:
        fig.text(0.01, -0.02, "no run: " + ", ".join(display_name(config, i) for i in absent), fontsize="small")
    fig.suptitle(f"Fine-tuning curves (label ratio {ratio_label(ratio)}), mean ± std over folds - {task}",
                 y=1.04)
    save_figure(fig, outs)


# --------------------------------------------------------------------------- Table 4 as a figure


def plot_label_ratios(config: Mapping[str, Any], table4: pd.DataFrame, outs: Sequence[Path]) -> None:
    """Dice vs label fraction (log x) per init, one panel per task, from Table 4's long-form numbers."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(table4["task"]))
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        sub = table4[table4["task"] == task]
        for init in dict.fromkeys(sub["init"]):
            rows = sub[(sub["init"] == init) & np.isfinite(sub["mean"])].sort_values("ratio")
            if rows.empty:
                continue
            ax.errorbar(rows["ratio"], rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3,
                        label=display_name(config, init))
        column = sub["column"].iloc[0].rsplit(" ", 1)[0] if len(sub) else ""
        ax.set_xscale("log")
        ratios = sorted(set(sub["ratio"]))
        ax.set_xticks(ratios, [ratio_label(r) for r in ratios])
        ax.minorticks_off()
        ax.set(xlabel="fraction of annotated training cases", ylabel="Dice (%)", title=f"{task} ({column})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    missing = table4[~np.isfinite(table4["mean"]) | (table4["missing_folds"].fillna("") != "")]
    if len(missing):
        fig.text(0.01, -0.02, f"{len(missing)} cell(s) with missing folds: see table4.md", fontsize="small")
    save_figure(fig, outs)


# --------------------------------------------------------------------------- qualitative


def decode_prediction(code: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse of :func:`sar3d.evaluation.run.prediction_code`: ``(C, X, Y, Z)`` booleans."""
    code = np.asarray(code).astype(np.int64)
    return np.stack([(code >> c) & 1 for c in range(n_classes)]).astype(bool)


def best_axial_slice(mask: np.ndarray) -> int:
    """The z index with the largest mask area (the middle slice when the mask is empty)."""
    area = mask.reshape(-1, mask.shape[-1]).sum(0)
    return int(area.argmax()) if area.any() else mask.shape[-1] // 2


def plot_qualitative(
    config: Mapping[str, Any], task: str, data: Path, split: Path, predictions: Mapping[str, Path],
    outs: Sequence[Path],
) -> None:
    """Rows = first test cases of the split, columns = image + reference, then each init's prediction."""
    from matplotlib.colors import ListedColormap

    from sar3d.data.tasks import class_channels, read_manifest
    from sar3d.metrics import dice_score

    plt = _pyplot()
    classes = list(config["tasks"][task]["classes"])
    colors = plt.get_cmap("tab10").colors
    manifest = read_manifest(data)
    n_cases = config["evaluate"]["save_predictions"]
    cases = [c for c in read_json(split)["test"][:n_cases]]
    inits = list(predictions)
    fig, axes = plt.subplots(max(len(cases), 1), len(inits) + 1, figsize=(2.6 * (len(inits) + 1),
                             2.8 * max(len(cases), 1)), squeeze=False)
    for row, case in enumerate(cases):
        entry = manifest[case]
        image = load_volume(Path(data) / entry["image"])[0]
        ref = class_channels(np.rint(load_volume(Path(data) / entry["label"])[0]), config["tasks"][task]["classes"])
        ref = ref.astype(bool)
        z = best_axial_slice(ref[0])
        for col, init in enumerate([None, *inits]):
            ax = axes[row][col]
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
            title = f"{case} z={z}\nreference" if init is None else display_name(config, init)
            file = None if init is None else Path(predictions[init]) / f"{case}.nii.gz"
            if file is not None and file.exists():
                pred = decode_prediction(load_volume(file)[0], len(classes))
                scores = ", ".join(f"{dice_score(pred[c], ref[c]):.2f}" for c in range(len(classes)))
                title += f"\nDice {scores}"
                for c in range(len(classes)):
                    layer = np.ma.masked_where(~pred[c][:, :, z].T, pred[c][:, :, z].T)
                    ax.imshow(layer, cmap=ListedColormap([colors[c % 10]]), alpha=0.45, origin="lower")
            elif file is not None:
                title += "\n(no prediction)"
            for c in range(len(classes)):
                if ref[c][:, :, z].any():
                    ax.contour(ref[c][:, :, z].T.astype(float), levels=[0.5], colors=[colors[c % 10]],
                               linewidths=1.0)
            ax.set_title(title, fontsize="small")
            ax.axis("off")
    legend = ", ".join(f"{name}: {['blue', 'orange', 'green', 'red'][i % 4]}" for i, name in enumerate(classes))
    fig.suptitle(f"{task}, fold {QUALITATIVE_FOLD}: outline = reference, fill = prediction ({legend})",
                 fontsize="small")
    save_figure(fig, outs)


def prediction_folders(config: Mapping[str, Any], task: str) -> dict[str, Path]:
    """Each init's saved predictions of fold 0 at label ratio 1."""
    return {
        init: paths.fill(paths.EVALUATION_PREDICTIONS, config["results_dir"], task=task, init=init,
                         ratio=paths.ratio_tag(1.0), fold=QUALITATIVE_FOLD)
        for init in config["finetune"]["inits"]
    }


def run_figures_all(config: Mapping[str, Any]) -> list[Path]:
    """Loss curves and qualitative figures of every task, from whatever exists."""
    results = config["results_dir"]
    written: list[Path] = []
    for task in config["tasks"]:
        for ratio in config["report"]["loss_curve_ratios"]:
            outs = figure_paths(config, loss_curve_name(task, ratio))
            plot_loss_curves(config, task, outs, ratio)
            written += outs
        data = paths.fill(paths.PREPROCESSED_TASK, results, task=task)
        split = paths.fill(paths.SPLIT, results, task=task, fold=QUALITATIVE_FOLD)
        if not (data / paths.MANIFEST).exists() or not split.exists():
            log.warning("no preprocessed data or split for %s: qualitative figure skipped", task)
            continue
        outs = figure_paths(config, f"qualitative_{task}")
        plot_qualitative(config, task, data, split, prediction_folders(config, task), outs)
        written += outs
    return written
