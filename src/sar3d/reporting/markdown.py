"""A table as Markdown: cells, footnotes for missing folds and size buckets, the comparison with the reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from sar3d import paths
from sar3d.data.splits import AUTO, bucket_rule
from sar3d.io import read_json
from sar3d.pretraining.registry import display_name
from sar3d.reporting.tables import Column, TableSpec

DASH = "—"


def format_cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return DASH
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def format_p(p: float) -> str:
    return "n/a" if np.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _headers(spec: TableSpec) -> list[str]:
    labels = [c.label for c in spec.columns]
    dup = {x for x in labels if labels.count(x) > 1}
    return [f"{c.task} {c.label}" if c.label in dup else c.label for c in spec.columns]


def _cell_record(table: pd.DataFrame, col: Column, init: str) -> pd.Series:
    rec = table[(table["task"] == col.task) & (table["column"] == col.label) & (table["init"] == init)]
    return rec.iloc[0]


def bucket_note(config: Mapping[str, Any], task: str) -> str:
    """How a bucketed task's size buckets were set, from the split's ``size_buckets.json`` (auto: only there)."""
    tspec = config["tasks"][task]
    first = next(iter(tspec["classes"]))
    path = paths.fill(paths.SIZE_BUCKETS, config["results_dir"], task=task)
    if path.exists():
        record = read_json(path)
        rule, how = bucket_rule(record["thresholds_mm3"]), record["how"]
    elif tspec["size_buckets_mm3"] == AUTO:
        return (f"Size buckets by reference {first} volume: tertiles of the cases never tested, "
                f"not known here ({path} does not exist).")
    else:
        rule, how = bucket_rule(tspec["size_buckets_mm3"]), "set in the config"
    return f"Size buckets by reference {first} volume: {rule} ({how})."


def render_markdown(config: Mapping[str, Any], spec: TableSpec, table: pd.DataFrame) -> str:
    """A table as Markdown: values with the best bold, the comparison with the reference, notes."""
    headers = _headers(spec)
    unit = spec.metric.unit
    notes: list[str] = []
    lines = [f"# {spec.title}", ""]
    lines += ["| Init | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for init in spec.inits:
        cells = []
        for col in spec.columns:
            r = _cell_record(table, col, init)
            cell = format_cell(r["mean"], r["std"])
            note = None
            if r["missing_folds"]:
                note = (
                    f"{display_name(config, init)}, {col.task} {col.label}: no evaluation for fold(s) "
                    f"{r['missing_folds']}; "
                    f"over the {r['n_folds']} fold(s) present: {cell}"
                )
                cell = DASH
            elif r["folds_without_cases"]:
                note = (
                    f"{display_name(config, init)}, {col.task} {col.label}: fold(s) {r['folds_without_cases']} "
                    f"have no test case with a value in this group; mean over {r['n_folds']} fold(s)"
                )
            if r["best"]:
                cell = f"**{cell}**"
            if note:
                notes.append(note)
                cell += f" [{len(notes)}]"
            cells.append(cell)
        lines.append(f"| {display_name(config, init)} | " + " | ".join(cells) + " |")
    direction = "highest" if spec.metric.higher_is_better else "lowest"
    lines += [
        "",
        f"Cells: {spec.metric.name} ({unit}), mean ± sample standard deviation (ddof = 1) over folds/trials of the "
        f"per-fold mean over test cases. **Bold**: {direction} mean of the column among cells with every fold.",
    ]
    for task in dict.fromkeys(c.task for c in spec.columns):
        tspec = config["tasks"][task]
        split = tspec["split"]
        kind = "random trials" if split["kind"] == "trials" else "cross-validation folds"
        cols = ", ".join(c.label for c in spec.columns if c.task == task)
        lines.append(f"- **{task}** ({cols}): {split['n']} {kind}.")
        if tspec.get("size_buckets_mm3"):
            lines.append(f"  {bucket_note(config, task)}")
    lines += _comparison_markdown(config, spec, table, headers)
    lines += ["", "MLflow run ids of every cell (evaluation and fine-tuning, per fold) are in the CSV "
              "(`eval_run_ids`, `finetune_run_ids`)."]
    if notes:
        lines += ["", "Notes:", ""] + [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def _comparison_markdown(
    config: Mapping[str, Any], spec: TableSpec, table: pd.DataFrame, headers: list[str]
) -> list[str]:
    reference = config["report"]["reference"]
    others = [i for i in spec.inits if i != reference]
    if reference not in spec.inits or not others:
        return []
    rcfg = config["report"]
    test = "Student's" if rcfg["ttest_equal_var"] else "Welch's"
    lines = [
        "", f"## {display_name(config, reference)} vs each other initialisation", "",
        f"Δ = mean({display_name(config, reference)}) − mean(other) in {spec.metric.unit}, with its "
        f"{rcfg['confidence']:.0%} percentile bootstrap CI ({rcfg['bootstrap_samples']} resamples of the folds, "
        f"seeded); p = two-sided {test} two-sample t-test over folds. n/a: fewer than 2 folds on a side.", "",
        "| vs | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers),
    ]
    for init in others:
        cells = []
        for col in spec.columns:
            r = _cell_record(table, col, init)
            if np.isnan(r["mean_diff"]):
                cells.append(DASH)
                continue
            ci = "" if np.isnan(r["ci_low"]) else f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            cells.append(f"Δ {r['mean_diff']:+.2f}{ci}, p {format_p(r['p_value'])}")
        lines.append(f"| {display_name(config, init)} | " + " | ".join(cells) + " |")
    return lines
