"""The paper's Table 2 from evaluation CSVs.

Rows are the inits in ``finetune.inits`` order (then any other init found in the
files). Columns: for a task with ``size_buckets_mm3`` (brain tumour) the first
class's Dice of test cases in each size bucket and over all cases (``Tumour S``,
``Tumour M``, ``Tumour L``, ``Tumour all``); for any other task one column per
class (pancreas ``Organ``, ``Tumour``). A task with no evaluation at all is
left out. Only label ratio 1 enters Table 2.

Each cell is computed in two stages, as the paper reports it: per fold (or
trial) the mean Dice over that fold's test cases (NaN rows - class absent in
both prediction and reference - excluded), then mean ± sample standard
deviation (ddof = 1) of those per-fold means over folds, ×100, two decimals.

Nothing is dropped silently: when an expected (init, fold) has no evaluation
the cell shows "—" with a footnote naming the missing folds and giving the
value over the folds present; when a fold has no test case in a size bucket
the cell is computed over the other folds and footnoted. The CSV holds the
numbers (mean, std, n_folds, missing folds) for every (init, task, column).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sar3d.evaluate import bucket_rule
from sar3d.io import InputDataError, atomic_output

log = logging.getLogger(__name__)

BUCKETS = (("small", "S"), ("medium", "M"), ("large", "L"))
DISPLAY = {
    "scratch": "Scratch", "genesis": "Genesis", "sa": "+ SA", "mial": "+ MIAL", "sar": "SAR",
    "sar_s2": "SAR (1/2 only)", "sar_s4": "SAR (1/4 only)", "sar_s8": "SAR (1/8 only)",
}
DASH = "—"


def class_title(name: str) -> str:
    """``whole_tumour`` -> ``Tumour``, ``organ`` -> ``Organ`` (the paper's column words)."""
    return name.split("_")[-1].capitalize()


def read_evaluations(paths: Sequence[Path]) -> pd.DataFrame:
    """All evaluation rows, with the file each came from checked for the expected columns."""
    from sar3d.evaluate import CSV_COLUMNS

    frames = []
    for path in paths:
        frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
        missing = sorted(set(CSV_COLUMNS) - set(frame.columns))
        if missing:
            raise InputDataError(path, f"evaluation file lacks columns {missing}")
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=CSV_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out["size_bucket"] = out["size_bucket"].fillna("").astype(str)
    out["dice"] = pd.to_numeric(out["dice"], errors="coerce")
    out["fold"] = out["fold"].astype(int)
    out["ratio"] = out["ratio"].astype(float)
    return out


def column_specs(config: Mapping[str, Any], present_tasks: set[str]) -> list[dict[str, Any]]:
    """Every Table 2 column as (task, class, bucket or None, label), in config order."""
    specs = []
    for task, spec in config["tasks"].items():
        if task not in present_tasks:
            continue
        classes = list(spec["classes"])
        if spec.get("size_buckets_mm3"):
            title = class_title(classes[0])
            for bucket, short in BUCKETS:
                specs.append({"task": task, "class": classes[0], "bucket": bucket, "label": f"{title} {short}"})
            specs.append({"task": task, "class": classes[0], "bucket": None, "label": f"{title} all"})
        else:
            for name in classes:
                specs.append({"task": task, "class": name, "bucket": None, "label": class_title(name)})
    return specs


def per_fold_means(rows: pd.DataFrame, cls: str, bucket: str | None) -> pd.Series:
    """Mean Dice over test cases per fold (NaN where a fold has no usable case)."""
    sub = rows[rows["class"] == cls]
    if bucket is not None:
        sub = sub[sub["size_bucket"] == bucket]
    return sub.groupby("fold")["dice"].mean()


def build_table(config: Mapping[str, Any], frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Long-form numbers (one row per init and column) and the column specs used."""
    frame = frame[np.isclose(frame["ratio"], 1.0)]
    present = set(frame["task"].unique())
    specs = column_specs(config, present)
    order = list(config["finetune"]["inits"])
    inits = order + sorted(set(frame["init"]) - set(order))
    records = []
    for spec in specs:
        task = spec["task"]
        expected = list(range(config["tasks"][task]["split"]["n"]))
        for init in inits:
            rows = frame[(frame["task"] == task) & (frame["init"] == init)]
            evaluated = sorted(int(f) for f in rows["fold"].unique())
            means = per_fold_means(rows, spec["class"], spec["bucket"]).dropna() * 100.0
            records.append({
                "task": task, "column": spec["label"], "class": spec["class"], "size_bucket": spec["bucket"] or "all",
                "init": init,
                "mean": float(means.mean()) if len(means) else np.nan,
                "std": float(means.std(ddof=1)) if len(means) > 1 else np.nan,
                "n_folds": len(means),
                "n_expected": len(expected),
                "missing_folds": " ".join(str(f) for f in expected if f not in evaluated),
                "folds_without_cases": " ".join(str(f) for f in evaluated if f not in means.index),
            })
    return pd.DataFrame.from_records(records), specs


def format_cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return DASH
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def render_markdown(config: Mapping[str, Any], table: pd.DataFrame, specs: list[dict[str, Any]]) -> str:
    """Table 2 as Markdown with the bucket rule, the number of folds and footnotes."""
    labels = [s["label"] for s in specs]
    dup = {x for x in labels if labels.count(x) > 1}
    headers = [f"{s['task']} {s['label']}" if s["label"] in dup else s["label"] for s in specs]
    inits = list(dict.fromkeys(table["init"])) if len(table) else list(config["finetune"]["inits"])
    notes: list[str] = []
    lines = ["# Table 2: Dice (%) on the test cases, label ratio 1", ""]
    lines += ["| Init | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for init in inits:
        cells = []
        for spec in specs:
            rec = table[(table["task"] == spec["task"]) & (table["column"] == spec["label"]) & (table["init"] == init)]
            r = rec.iloc[0]
            cell = format_cell(r["mean"], r["std"])
            note = None
            if r["missing_folds"]:
                value = format_cell(r["mean"], r["std"])
                note = (
                    f"{DISPLAY.get(init, init)}, {spec['task']} {spec['label']}: no evaluation for fold(s) "
                    f"{r['missing_folds']}; over the {r['n_folds']} fold(s) present: {value}"
                )
                cell = DASH
            elif r["folds_without_cases"]:
                note = (
                    f"{DISPLAY.get(init, init)}, {spec['task']} {spec['label']}: fold(s) {r['folds_without_cases']} "
                    f"have no test case in this group; mean over {r['n_folds']} fold(s)"
                )
            if note:
                notes.append(note)
                cell += f" [{len(notes)}]"
            cells.append(cell)
        lines.append(f"| {DISPLAY.get(init, init)} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ± sample standard deviation (ddof = 1) over folds/trials of the per-fold mean Dice."]
    for task in dict.fromkeys(s["task"] for s in specs):
        spec = config["tasks"][task]
        split = spec["split"]
        kind = "random trials" if split["kind"] == "trials" else "cross-validation folds"
        cols = ", ".join(s["label"] for s in specs if s["task"] == task)
        lines.append(f"- **{task}** ({cols}): {split['n']} {kind}.")
        if spec.get("size_buckets_mm3"):
            first = next(iter(spec["classes"]))
            lines.append(f"  Size buckets by reference {first} volume: {bucket_rule(spec['size_buckets_mm3'])}.")
    if notes:
        lines += ["", "Notes:", ""] + [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def run_report(config: dict[str, Any], evaluations: list[Path], out_csv: Path, out_md: Path) -> None:
    """Write Table 2 as numbers (CSV) and formatted (Markdown), and log both to MLflow."""
    from sar3d.tracking import tracked_run

    frame = read_evaluations([Path(p) for p in evaluations])
    table, specs = build_table(config, frame)
    markdown = render_markdown(config, table, specs)
    params = {"finetune.inits": config["finetune"]["inits"], "n_evaluations": len(evaluations)}
    with tracked_run(config, "report", {"table": "table2"}, params=params) as run:
        with atomic_output(out_csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
        with atomic_output(out_md) as tmp:
            tmp.write_text(markdown)
        run.metrics({
            f"{r.task}/{r.column}/{r.init}".replace(" ", "_"): r.mean for r in table.itertuples() if np.isfinite(r.mean)
        })
        run.artifact(out_csv)
        run.artifact(out_md)
