"""Reading the evaluation files of the study grid (and their MLflow run ids) for the tables."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sar3d import paths
from sar3d.evaluation.run import CSV_COLUMNS, OPTIONAL_COLUMNS, sidecar_path
from sar3d.grid import finetune_jobs
from sar3d.io import InputDataError, read_json
from sar3d.reporting.runs import Key, stage_runs

log = logging.getLogger(__name__)


@dataclass
class Evaluations:
    """Every evaluation row read, the expected grid and the run ids of what was read."""

    frame: pd.DataFrame
    expected: dict[Key, Path]
    eval_runs: dict[Key, str]
    finetune_runs: dict[Key, str]


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


def read_grid(config: Mapping[str, Any], files: Sequence[Path] | None = None) -> Evaluations:
    """Evaluations of ``files``, or of every expected file that exists when ``files`` is None."""
    expected = expected_files(config)
    if files is None:
        files = [p for p in expected.values() if p.exists()]
        log.info("%d of %d expected evaluation files exist", len(files), len(expected))
    frame, eval_runs = read_evaluations([Path(p) for p in files])
    finetune_runs = {k: r.info.run_id for k, r in stage_runs(config, "finetune").items()}
    return Evaluations(frame, expected, eval_runs, finetune_runs)
