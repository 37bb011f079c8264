"""``sar3d compare``: the study's runs side by side, straight from the tracking store.

The MLflow UI compares a handful of runs; a study has dozens of jobs per stage.
This lists every job's *latest* run (a job rerun after a config change leaves its
older run behind, and the comparison must not average it in) grouped by stage,
then task / method / init / label ratio / fold, with the final value of each
metric, and can average over folds. Works the same on a sqlite store or a server.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sar3d.config import ConfigError, tracking_uri
from sar3d.io import atomic_output
from sar3d.tracking import STUDY_STAGE, _mlflow

# Identity tags, in display and sort order; the study's parent run is left out.
GROUP_TAGS = ("stage", "task", "dataset", "method", "init", "ratio", "fold")
FOLD_TAGS = ("fold",)  # what --mean averages over


def load_runs(
    config: Mapping[str, Any], stages: Sequence[str] = (), metrics: Sequence[str] = (), all_runs: bool = False
) -> pd.DataFrame:
    """One row per job (its latest run unless ``all_runs``): identity tags, status, metrics.

    ``metrics`` are glob patterns on metric names (``dice/*``, ``final/*``); empty = all.
    """
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri(dict(config)))
    name = config["tracking"]["experiment"]
    if mlflow.get_experiment_by_name(name) is None:
        uri = tracking_uri(dict(config))
        raise ConfigError(f"config key 'tracking.experiment': no experiment '{name}' in {uri} (has the study run?)")
    raw = mlflow.search_runs(
        experiment_names=[name], filter_string=f"tags.stage != '{STUDY_STAGE}'", output_format="pandas",
        order_by=["attributes.start_time ASC"],
    )
    return tidy_runs(raw, stages, metrics, all_runs)


def tidy_runs(
    raw: pd.DataFrame, stages: Sequence[str] = (), metrics: Sequence[str] = (), all_runs: bool = False
) -> pd.DataFrame:
    """``mlflow.search_runs`` output -> identity columns, status, run id and selected metrics, sorted."""
    if raw.empty:
        return pd.DataFrame(columns=[*GROUP_TAGS, "status", "run_id"])
    frame = raw.sort_values("start_time") if "start_time" in raw else raw
    if stages:
        frame = frame[frame["tags.stage"].isin(stages)]
    if not all_runs and "tags.job_key" in frame:
        frame = frame.drop_duplicates("tags.job_key", keep="last")
    ids = {f"tags.{t}": t for t in GROUP_TAGS if f"tags.{t}" in frame and frame[f"tags.{t}"].notna().any()}
    names = [c.removeprefix("metrics.") for c in frame.columns if c.startswith("metrics.") and frame[c].notna().any()]
    chosen = [m for m in names if not metrics or any(fnmatch.fnmatchcase(m, p) for p in metrics)]
    out = frame[[*ids, "status", "run_id", *(f"metrics.{m}" for m in chosen)]].rename(columns=ids)
    out = out.rename(columns={f"metrics.{m}": m for m in chosen})
    if "ratio" in out:
        out["ratio"] = pd.to_numeric(out["ratio"], errors="coerce")
    if "fold" in out:
        out["fold"] = pd.to_numeric(out["fold"], errors="coerce").astype("Int64")
    keys = [t for t in GROUP_TAGS if t in out]
    return out.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


def mean_over_folds(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of every metric over folds, per remaining identity."""
    keys = [t for t in GROUP_TAGS if t in runs and t not in FOLD_TAGS]
    metrics = [c for c in runs.columns if c not in (*GROUP_TAGS, "status", "run_id")]
    grouped = runs.groupby([runs[k].fillna("") for k in keys], sort=True)[metrics]
    stats = grouped.agg(["mean", "std"])
    stats.columns = [f"{metric}:{stat}" for metric, stat in stats.columns]
    stats.insert(0, "n", grouped.size())
    return stats.reset_index()


def _number(value: float) -> str:
    """Counts as integers, scores with 4 decimals."""
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


def format_runs(runs: pd.DataFrame) -> str:
    """One block per stage, with only the columns that stage fills."""
    if runs.empty:
        return "no runs"
    blocks = []
    for stage, block in runs.groupby("stage", sort=False):
        block = block.drop(columns="stage").dropna(axis=1, how="all")
        block = block.loc[:, [c for c in block.columns if not (block[c].astype(str) == "").all()]]
        formats = {c: _number for c in block.columns if pd.api.types.is_float_dtype(block[c])}
        if "ratio" in formats:
            formats["ratio"] = "{:g}".format
        text = block.to_string(index=False, formatters=formats, na_rep="-")
        blocks.append(f"== {stage} ({len(block)} {'groups' if 'n' in block else 'runs'}) ==\n{text}")
    return "\n\n".join(blocks)


def run_compare(
    config: Mapping[str, Any], stages: Sequence[str] = (), metrics: Sequence[str] = (), mean: bool = False,
    all_runs: bool = False, csv: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Print the comparison (and write it as CSV); returns the table."""
    table = load_runs(config, stages, metrics, all_runs)
    if mean:
        table = mean_over_folds(table)
    print(format_runs(table))
    if csv is not None:
        with atomic_output(Path(csv)) as tmp:
            table.to_csv(tmp, index=False)
    return table
