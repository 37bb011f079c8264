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
    """The reference vs each other init (Δ = reference - other), then each init vs each baseline (Δ = init -
    baseline): one section per comparison whose rows are in the table."""
    reference = config["report"]["reference"]
    lines = []
    if reference in spec.inits:
        name = display_name(config, reference)
        others = [i for i in spec.inits if i != reference]
        lines += _comparison_section(config, spec, table, headers, f"{name} vs each other initialisation",
                                     f"Δ = mean({name}) − mean(other)", others, "")
    for baseline in config["report"]["baselines"]:
        if baseline in spec.inits:
            name = display_name(config, baseline)
            others = [i for i in spec.inits if i != baseline]
            lines += _comparison_section(config, spec, table, headers, f"Each initialisation vs {name}",
                                         f"Δ = mean(row) − mean({name})", others, f"_vs_{baseline}")
    return lines


def _comparison_section(
    config: Mapping[str, Any], spec: TableSpec, table: pd.DataFrame, headers: list[str], title: str, delta: str,
    rows: list[str], suffix: str,
) -> list[str]:
    if not rows:
        return []
    rcfg = config["report"]
    test = "Student's" if rcfg["ttest_equal_var"] else "Welch's"
    lines = [
        "", f"## {title}", "",
        f"{delta} in {spec.metric.unit}, with its "
        f"{rcfg['confidence']:.0%} percentile bootstrap CI ({rcfg['bootstrap_samples']} resamples of the folds, "
        f"seeded); p = two-sided {test} two-sample t-test over folds. n/a: fewer than 2 folds on a side.", "",
        "| vs | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers),
    ]
    for init in rows:
        cells = []
        for col in spec.columns:
            r = _cell_record(table, col, init)
            if np.isnan(r[f"mean_diff{suffix}"]):
                cells.append(DASH)
                continue
            low, high = r[f"ci_low{suffix}"], r[f"ci_high{suffix}"]
            ci = "" if np.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"
            cells.append(f"Δ {r[f'mean_diff{suffix}']:+.2f}{ci}, p {format_p(r[f'p_value{suffix}'])}")
        lines.append(f"| {display_name(config, init)} | " + " | ".join(cells) + " |")
    return lines
