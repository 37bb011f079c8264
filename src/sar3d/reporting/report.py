"""The paper's tables (2, 3, 4) from the evaluation CSVs, with statistics and MLflow run ids.

Every table is built by one engine from a :class:`~sar3d.reporting.tables.TableSpec`
(rows = inits in their methods' order, columns = :class:`~sar3d.reporting.tables.Column`);
only the specs differ:

* ``table2`` - the main inits of ``finetune.inits`` and ``finetune.full_label_inits``
  (not the scale ablations), label ratio 1. For a task with ``size_buckets_mm3`` (brain tumour) the first
  class's Dice of test cases in each size bucket and over all cases (``Tumour
  S/M/L/all``); for any other task one column per class (pancreas ``Organ``,
  ``Tumour``). ``table2_hd95`` is the same grid for HD95 (mm, lower is better).
* ``table3`` - the scale-ablation inits (single-scale SAR) vs ``report.reference``
  on the bucketed task(s). Built only when at least one of them is in
  ``finetune.ablation_inits`` (or ``finetune.inits``); otherwise it is not a
  target (:func:`sar3d.grid.configured_tables`).
* ``table4`` - every init at every ``finetune.label_ratios`` entry; per task its
  headline number: the first class over all cases for a bucketed task (``Tumour
  all``), else the mean of the classes' Dice (pancreas: the paper's "MSD
  (Average)"). A figure of the same is drawn by :mod:`sar3d.reporting.figures`.

Each cell is computed in two stages, as the paper reports it: per fold (or
trial) the mean over that fold's test cases (NaN rows excluded; for an average
column the mean of the classes' per-fold means), then mean ± sample standard
deviation (ddof = 1) over folds, Dice ×100. Every other init is compared with
``report.reference`` (SAR) per column over folds (:mod:`sar3d.reporting.stats`): t-test
p-value and a seeded bootstrap CI of the difference of means (reference − other);
and every init with each of ``report.baselines`` (scratch: does a pre-training
help at all?), as columns ``*_vs_<baseline>`` (init − baseline).

The best cell of each column (highest Dice / lowest HD95, among cells with
every fold present) is bold in Markdown and flagged ``best`` in the CSV.

Nothing is dropped silently: the expected grid comes from the config, and an
(init, fold) without an evaluation file makes its cell "—" with a footnote
naming the missing folds and giving the value over the folds present (so a
partial grid - jobs that failed under ``snakemake --keep-going`` - still gives
every table: ``sar3d report-all``); a fold without a test case in a size bucket
is footnoted. A bucketed task's footnote gives its thresholds and how they were
set (for ``auto``: computed by the split stage, read from ``size_buckets.json``).
Each CSV row carries the MLflow run ids of the evaluations
(from the JSON sidecars) and fine-tuning runs (from the tracking store) it
came from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sar3d import paths
from sar3d.grid import bucketed_tasks, configured_tables
from sar3d.io import atomic_output
from sar3d.reporting.evaluations import Evaluations, read_grid
from sar3d.reporting.markdown import bucket_note, render_markdown
from sar3d.reporting.runs import Key
from sar3d.reporting.stats import compare_as_configured
from sar3d.reporting.tables import Column, Metric, TableSpec, table_spec
from sar3d.seeding import derive_seed

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- numbers


def fold_values(rows: pd.DataFrame, column: Column, metric: Metric) -> pd.Series:
    """Per evaluated fold: mean over test cases of each class (bucket only), averaged over the column's classes.

    NaN where a fold has no usable case for one of the classes.
    """
    folds = sorted(int(f) for f in rows["fold"].unique())
    per_class = []
    for cls in column.classes:
        sub = rows[rows["class"] == cls]
        if column.bucket is not None:
            sub = sub[sub["size_bucket"] == column.bucket]
        per_class.append(sub.groupby("fold")[metric.column].mean().reindex(folds))
    if not folds:
        return pd.Series(dtype=float)
    return pd.concat(per_class, axis=1).mean(axis=1, skipna=False) * metric.scale


def _run_ids(runs: Mapping[Key, str], task: str, init: str, tag: str, folds: Sequence[int]) -> str:
    return " ".join(runs.get((task, init, tag, f), "") or "-" for f in folds)


def build_table(config: Mapping[str, Any], spec: TableSpec, grid: Evaluations) -> pd.DataFrame:
    """Long form: one row per (column, init) with mean, std, folds, best flag, comparison and run ids."""
    frame = grid.frame
    reference = config["report"]["reference"]
    rcfg = config["report"]
    records = []
    for col in spec.columns:
        tag = paths.ratio_tag(col.ratio)
        n_expected = config["tasks"][col.task]["split"]["n"]
        values: dict[str, pd.Series] = {}
        for init in spec.inits:
            rows = frame[(frame["task"] == col.task) & (frame["init"] == init) & (frame["ratio_tag"] == tag)] \
                if len(frame) else frame
            per_fold = fold_values(rows, col, spec.metric)
            values[init] = per_fold.dropna()
            evaluated = list(per_fold.index)
            expected = range(n_expected)
            means = values[init]
            records.append({
                "table": spec.name, "task": col.task, "column": col.label, "class": "+".join(col.classes),
                "size_bucket": col.bucket or "all", "ratio": col.ratio, "init": init,
                "metric": spec.metric.column,
                "mean": float(means.mean()) if len(means) else np.nan,
                "std": float(means.std(ddof=1)) if len(means) > 1 else np.nan,
                "n_folds": len(means), "n_expected": n_expected,
                "missing_folds": " ".join(str(f) for f in expected if f not in evaluated),
                "folds_without_cases": " ".join(str(f) for f in evaluated if f not in means.index),
                "fold_values": " ".join(f"{f}:{v:.4f}" for f, v in means.items()),
                "eval_run_ids": _run_ids(grid.eval_runs, col.task, init, tag, evaluated),
                "finetune_run_ids": _run_ids(grid.finetune_runs, col.task, init, tag, evaluated),
            })
        for rec in records[-len(spec.inits):]:
            init = rec["init"]
            # Δ = reference - init (the paper's "SAR vs others"), then init - baseline per baseline
            rec.update(reference=reference if reference in values and init != reference else "",
                       **_compared(config, spec, col, values, reference, init, ""))
            for baseline in rcfg["baselines"]:
                rec.update(_compared(config, spec, col, values, init, baseline, f"_vs_{baseline}"))
    table = pd.DataFrame.from_records(records)
    table["best"] = best_flags(table, spec.metric)
    return table


COMPARISON_FIELDS = ("mean_diff", "p_value", "ci_low", "ci_high")


def _compared(
    config: Mapping[str, Any], spec: TableSpec, col: Column, values: Mapping[str, pd.Series], first: str,
    second: str, suffix: str,
) -> dict[str, float]:
    """``mean(first) - mean(second)`` over folds, its p-value and CI, as ``<field><suffix>``; NaN if either is
    not a row of the table or they are the same init."""
    if first == second or first not in values or second not in values:
        return {f"{field}{suffix}": np.nan for field in COMPARISON_FIELDS}
    # the seed of the reference comparison is the one tables had before baselines existed
    pair = (second,) if first == config["report"]["reference"] else (first, second)
    cmp = compare_as_configured(config, values[first].to_numpy(), values[second].to_numpy(),
                                derive_seed(config["seed"], "report", spec.name, col.task, col.label, *pair))
    return {f"{field}{suffix}": getattr(cmp, field) for field in COMPARISON_FIELDS}


def best_flags(table: pd.DataFrame, metric: Metric) -> pd.Series:
    """True for the best mean of each column among cells with every fold present (ties all marked)."""
    flags = pd.Series(False, index=table.index)
    complete = (table["missing_folds"] == "") & np.isfinite(table["mean"])
    for _, group in table[complete].groupby(["task", "column"], sort=False):
        best = group["mean"].max() if metric.higher_is_better else group["mean"].min()
        flags[group.index[np.isclose(group["mean"], best, rtol=0, atol=1e-9)]] = True
    return flags


# --------------------------------------------------------------------------- the stage


def write_table(config: Mapping[str, Any], name: str, grid: Evaluations, out_csv: Path, out_md: Path) -> pd.DataFrame:
    """Build one table and write its CSV (numbers) and Markdown (formatted)."""
    spec = table_spec(config, name)
    table = build_table(config, spec, grid)
    with atomic_output(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_output(out_md) as tmp:
        tmp.write_text(render_markdown(config, spec, table))
    return table


def run_report(
    config: dict[str, Any], evaluations: Sequence[Path] | None, out_csv: Path | None = None,
    out_md: Path | None = None, table: str = "table2", figure: Sequence[Path] = (),
) -> None:
    """Write one table (and for Table 4 its figure, PNG/SVG paths in ``figure``); log them to MLflow.

    ``evaluations`` None reads whichever expected evaluation files exist.
    """
    from sar3d.tracking import tracked_run

    results = config["results_dir"]
    out_csv = Path(out_csv or paths.fill(paths.TABLE, results, table=table))
    out_md = Path(out_md or paths.fill(paths.TABLE_MD, results, table=table))
    grid = read_grid(config, evaluations)
    params = {"finetune.inits": config["finetune"]["inits"], "report": config["report"],
              "n_evaluations": int(grid.frame[["task", "init", "ratio", "fold"]].drop_duplicates().shape[0]),
              "size_buckets": {task: bucket_note(config, task) for task in bucketed_tasks(config)}}
    with tracked_run(config, "report", {"table": table}, params=params) as run:
        numbers = write_table(config, table, grid, out_csv, out_md)
        written = [out_csv, out_md]
        if figure:
            from sar3d.reporting.figures import plot_label_ratios

            plot_label_ratios(config, numbers, [Path(p) for p in figure])
            written += [Path(p) for p in figure]
        run.metrics({
            f"{r.task}/{r.column}/{r.init}".replace(" ", "_"): r.mean
            for r in numbers.itertuples() if np.isfinite(r.mean)
        })
        for path in written:
            run.artifact(path)


def run_report_all(config: dict[str, Any]) -> list[Path]:
    """Every configured table and figure from whichever evaluations exist (the partial-grid recipe)."""
    from sar3d.reporting import figures
    from sar3d.reporting.restoration import run_restoration_all

    results = config["results_dir"]
    written = []
    for name in configured_tables(config):
        fig = [paths.fill(paths.FIGURE, results, figure="table4_label_ratios", ext=e) for e in figures.FORMATS] \
            if name == "table4" else []
        run_report(config, None, table=name, figure=fig)
        written += [paths.fill(paths.TABLE, results, table=name), *fig]
    if config["probe"]["inits"]:
        from sar3d.reporting.probe import run_probe_report

        run_probe_report(config, None)
        written.append(paths.fill(paths.TABLE, results, table="probe"))
    written += figures.run_figures_all(config)
    written += run_restoration_all(config)
    return written
