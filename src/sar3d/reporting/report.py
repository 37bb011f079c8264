"""The paper's tables (2, 3, 4) from the evaluation CSVs, with statistics and MLflow run ids.

Every table is built by one engine from a :class:`TableSpec` (rows = inits,
columns = :class:`Column`); only the specs differ:

* ``table2`` - inits of ``finetune.inits`` except the single-scale ablations,
  label ratio 1. For a task with ``size_buckets_mm3`` (brain tumour) the first
  class's Dice of test cases in each size bucket and over all cases (``Tumour
  S/M/L/all``); for any other task one column per class (pancreas ``Organ``,
  ``Tumour``). ``table2_hd95`` is the same grid for HD95 (mm, lower is better).
* ``table3`` - the single-scale ablations ``sar_s2/s4/s8`` vs multi-scale ``sar``
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
p-value and a seeded bootstrap CI of the difference of means.

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sar3d import paths
from sar3d.data.splits import AUTO, bucket_rule
from sar3d.evaluation.run import CSV_COLUMNS, OPTIONAL_COLUMNS, sidecar_path
from sar3d.grid import bucketed_tasks, configured_tables, finetune_jobs, table2_inits, table3_inits, table4_inits
from sar3d.io import InputDataError, atomic_output, read_json
from sar3d.pretraining.registry import display_name
from sar3d.reporting.stats import compare
from sar3d.seeding import derive_seed

log = logging.getLogger(__name__)

BUCKETS = (("small", "S"), ("medium", "M"), ("large", "L"))
DASH = "—"
Key = tuple[str, str, str, int]  # task, init, ratio tag, fold


@dataclass(frozen=True)
class Metric:
    """A CSV column and how tables show it."""

    column: str
    name: str
    unit: str
    scale: float
    higher_is_better: bool


DICE = Metric("dice", "Dice", "%", 100.0, True)
HD95 = Metric("hd95_mm", "HD95", "mm", 1.0, False)


@dataclass(frozen=True)
class Column:
    """One table column: the mean over ``classes`` of per-fold means (cases of ``bucket`` only)."""

    task: str
    label: str
    classes: tuple[str, ...]
    bucket: str | None
    ratio: float


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    inits: list[str]
    columns: list[Column]
    metric: Metric = DICE


@dataclass
class Grid:
    """Every evaluation row read, the expected grid and the run ids of what was read."""

    frame: pd.DataFrame
    expected: dict[Key, Path]
    eval_runs: dict[Key, str]
    finetune_runs: dict[Key, str]


def class_title(name: str) -> str:
    """``whole_tumour`` -> ``Tumour``, ``organ`` -> ``Organ`` (the paper's column words)."""
    return name.split("_")[-1].capitalize()


def ratio_label(ratio: float) -> str:
    """0.5 -> ``1/2``, 0.02 -> ``1/50``, 1 -> ``1``, 0.3 -> ``0.3`` (the paper writes proportions as fractions)."""
    if math.isclose(ratio, 1.0):
        return "1"
    inverse = 1.0 / ratio
    return f"1/{round(inverse)}" if math.isclose(inverse, round(inverse), rel_tol=1e-6) else f"{ratio:g}"


# --------------------------------------------------------------------------- reading the grid


def expected_files(config: Mapping[str, Any]) -> dict[Key, Path]:
    """The evaluation file of every (task, init, ratio, fold) job of the study grid (:mod:`sar3d.grid`)."""
    return {
        (j.task, j.init, j.ratio, j.fold): paths.fill(
            paths.EVALUATION, config["results_dir"], task=j.task, init=j.init, ratio=j.ratio, fold=j.fold
        )
        for j in finetune_jobs(config)
    }


def read_evaluations(files: Sequence[Path]) -> tuple[pd.DataFrame, dict[Key, str]]:
    """All evaluation rows (columns checked) and the evaluation run id of each file, from its sidecar."""
    required = sorted(set(CSV_COLUMNS) - set(OPTIONAL_COLUMNS))
    frames, runs = [], {}
    for path in files:
        frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
        missing = sorted(set(required) - set(frame.columns))
        if missing:
            raise InputDataError(path, f"evaluation file lacks columns {missing}")
        frames.append(frame.reindex(columns=CSV_COLUMNS))
        side = sidecar_path(path)
        run_id = read_json(side).get("mlflow_run_id") if side.exists() else None
        if run_id and len(frame):
            first = frame.iloc[0]
            runs[(str(first["task"]), str(first["init"]), paths.ratio_tag(float(first["ratio"])),
                  int(first["fold"]))] = run_id
    if not frames:
        return pd.DataFrame(columns=CSV_COLUMNS), runs
    out = pd.concat(frames, ignore_index=True)
    out["size_bucket"] = out["size_bucket"].fillna("").astype(str)
    for name in ("dice", "hd95_mm"):
        out[name] = pd.to_numeric(out[name], errors="coerce")
    out["fold"] = out["fold"].astype(int)
    out["ratio"] = out["ratio"].astype(float)
    out["ratio_tag"] = [paths.ratio_tag(r) for r in out["ratio"]]
    return out, runs


def mlflow_client(config: Mapping[str, Any]) -> Any:
    """A client on the study's tracking store."""
    from sar3d.config import tracking_uri
    from sar3d.tracking import _mlflow

    return _mlflow().MlflowClient(tracking_uri=tracking_uri(dict(config)))


def stage_runs(config: Mapping[str, Any], stage: str) -> dict[Key, Any]:
    """The latest finished MLflow run of ``stage`` per (task, init, ratio, fold), from the run tags.

    Returns ``{}`` (with a warning) when the store cannot be read: run ids are
    traceability, not numbers, and must not stop a report.
    """
    try:
        client = mlflow_client(config)
        experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
        if experiment is None:
            return {}
        runs, token = [], None
        while True:
            page = client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                max_results=1000, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except Exception as err:  # any store problem only costs the run ids
        log.warning("could not read %s runs from MLflow: %s", stage, err)
        return {}
    out: dict[Key, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.end_time or 0):  # the latest wins
        tags = run.data.tags
        try:
            key = (tags["task"], tags["init"], paths.ratio_tag(float(tags["ratio"])), int(tags["fold"]))
        except (KeyError, ValueError):
            continue
        out[key] = run
    return out


def read_grid(config: Mapping[str, Any], files: Sequence[Path] | None = None) -> Grid:
    """Evaluations of ``files``, or of every expected file that exists when ``files`` is None."""
    expected = expected_files(config)
    if files is None:
        files = [p for p in expected.values() if p.exists()]
        log.info("%d of %d expected evaluation files exist", len(files), len(expected))
    frame, eval_runs = read_evaluations([Path(p) for p in files])
    finetune_runs = {k: r.info.run_id for k, r in stage_runs(config, "finetune").items()}
    return Grid(frame, expected, eval_runs, finetune_runs)


# --------------------------------------------------------------------------- table specs


def task_columns(config: Mapping[str, Any], task: str, ratio: float = 1.0) -> list[Column]:
    """Table 2 columns of one task: per size bucket and all (bucketed task), else one per class."""
    spec = config["tasks"][task]
    classes = list(spec["classes"])
    if spec.get("size_buckets_mm3"):
        title = class_title(classes[0])
        cols = [Column(task, f"{title} {short}", (classes[0],), bucket, ratio) for bucket, short in BUCKETS]
        return [*cols, Column(task, f"{title} all", (classes[0],), None, ratio)]
    return [Column(task, class_title(name), (name,), None, ratio) for name in classes]


def headline_column(config: Mapping[str, Any], task: str, ratio: float) -> Column:
    """A task's single number (Table 4): first class over all cases if bucketed, else the class average."""
    spec = config["tasks"][task]
    classes = tuple(spec["classes"])
    if spec.get("size_buckets_mm3"):
        return Column(task, f"{class_title(classes[0])} all {ratio_label(ratio)}", classes[:1], None, ratio)
    return Column(task, f"Average {ratio_label(ratio)}", classes, None, ratio)


def table_spec(config: Mapping[str, Any], name: str) -> TableSpec:
    if name in ("table2", "table2_hd95"):
        columns = [c for task in config["tasks"] for c in task_columns(config, task)]
        rows = table2_inits(config)
        if name == "table2":
            return TableSpec(name, "Table 2: Dice (%) on the test cases, label ratio 1", rows, columns)
        return TableSpec(name, "Table 2 (HD95): 95th-percentile Hausdorff distance (mm), label ratio 1", rows,
                         columns, HD95)
    if name == "table3":
        columns = [c for task in bucketed_tasks(config) for c in task_columns(config, task)]
        return TableSpec(name, "Table 3: single-scale vs multi-scale SAR pre-training, Dice (%), label ratio 1",
                         table3_inits(config), columns)
    if name == "table4":
        ratios = sorted(config["finetune"]["label_ratios"], reverse=True)
        columns = [headline_column(config, task, r) for task in config["tasks"] for r in ratios]
        return TableSpec(name, "Table 4: Dice (%) by fraction of annotated training cases",
                         table4_inits(config), columns)
    raise ValueError(f"unknown table '{name}' (known: table2, table2_hd95, table3, table4)")


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


def build_table(config: Mapping[str, Any], spec: TableSpec, grid: Grid) -> pd.DataFrame:
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
            if reference in values and init != reference:
                cmp = compare(
                    values[reference].to_numpy(), values[init].to_numpy(),
                    seed=derive_seed(config["seed"], "report", spec.name, col.task, col.label, init),
                    equal_var=rcfg["ttest_equal_var"], n_resamples=rcfg["bootstrap_samples"],
                    confidence=rcfg["confidence"],
                )
                rec.update(reference=reference, mean_diff=cmp.mean_diff, p_value=cmp.p_value,
                           ci_low=cmp.ci_low, ci_high=cmp.ci_high)
            else:
                rec.update(reference="", mean_diff=np.nan, p_value=np.nan, ci_low=np.nan, ci_high=np.nan)
    table = pd.DataFrame.from_records(records)
    table["best"] = best_flags(table, spec.metric)
    return table


def best_flags(table: pd.DataFrame, metric: Metric) -> pd.Series:
    """True for the best mean of each column among cells with every fold present (ties all marked)."""
    flags = pd.Series(False, index=table.index)
    complete = (table["missing_folds"] == "") & np.isfinite(table["mean"])
    for _, group in table[complete].groupby(["task", "column"], sort=False):
        best = group["mean"].max() if metric.higher_is_better else group["mean"].min()
        flags[group.index[np.isclose(group["mean"], best, rtol=0, atol=1e-9)]] = True
    return flags


# --------------------------------------------------------------------------- Markdown


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


# --------------------------------------------------------------------------- the stage


def write_table(config: Mapping[str, Any], name: str, grid: Grid, out_csv: Path, out_md: Path) -> pd.DataFrame:
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

    results = config["results_dir"]
    written = []
    for name in configured_tables(config):
        fig = [paths.fill(paths.FIGURE, results, figure="table4_label_ratios", ext=e) for e in figures.FORMATS] \
            if name == "table4" else []
        run_report(config, None, table=name, figure=fig)
        written += [paths.fill(paths.TABLE, results, table=name), *fig]
    written += figures.run_figures_all(config)
    return written
