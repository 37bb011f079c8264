"""Table 2 from hand-written evaluation CSVs: numbers, order, buckets and missing folds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sar3d.config import load_config
from sar3d.evaluate import CSV_COLUMNS
from sar3d.report import run_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module: creating a sqlite store costs seconds."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def config(store: Path) -> dict[str, Any]:
    return load_config(
        REPO / "config.yaml",
        {
            "results_dir": str(store / "results"),
            "tracking": {"uri": f"sqlite:///{store}/mlflow.db", "experiment": "report-tests"},
            "finetune": {"inits": ["scratch", "genesis", "sar"]},
            "tasks": {"brain_tumour": {"split": {"n": 3}}, "pancreas": {"split": {"n": 3}}},
        },
    )


def _brain_rows(init: str, fold: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for i, bucket in enumerate(["small", "small", "medium", "large", "large"]):
        dice = float(rng.uniform(0.3, 0.95))
        rows.append({"case": f"b{i}", "class": "whole_tumour", "dice": dice, "size_bucket": bucket})
    return rows


def _pancreas_rows(init: str, fold: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for i in range(4):
        rows.append({"case": f"p{i}", "class": "organ", "dice": float(rng.uniform(0.5, 0.9)), "size_bucket": ""})
        # case p0 has no tumour and none predicted: NaN, must be left out of the means
        tumour = math.nan if i == 0 else float(rng.uniform(0.0, 0.6))
        rows.append({"case": f"p{i}", "class": "tumour", "dice": tumour, "size_bucket": ""})
    return rows


def _write(folder: Path, task: str, init: str, ratio: float, fold: int, rows: list[dict[str, Any]]) -> Path:
    frame = pd.DataFrame([{"task": task, "init": init, "ratio": ratio, "fold": fold, "volume_mm3": 1.0, **r}
                          for r in rows]).reindex(columns=CSV_COLUMNS)
    path = folder / task / init / f"r{ratio:g}" / f"fold{fold}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def evaluations(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for init in ["sar", "scratch", "genesis"]:  # file order must not matter
        for fold in range(3):
            paths.append(_write(tmp_path / "eval", "brain_tumour", init, 1.0, fold, _brain_rows(init, fold, rng)))
            if not (init == "sar" and fold == 2):  # missing (sar, pancreas, fold 2)
                paths.append(_write(tmp_path / "eval", "pancreas", init, 1.0, fold, _pancreas_rows(init, fold, rng)))
    # a label-ratio file with absurd values must not leak into Table 2
    paths.append(_write(tmp_path / "eval", "brain_tumour", "sar", 0.5, 0,
                        [{"case": "b0", "class": "whole_tumour", "dice": 0.0, "size_bucket": "small"}]))
    return paths


def _expected(paths: list[Path], task: str, init: str, cls: str, bucket: str | None) -> tuple[float, float]:
    """Independent computation: per-fold mean over cases, then mean and sample std over folds (x100)."""
    frame = pd.concat([pd.read_csv(p) for p in paths])
    frame = frame[(frame.ratio == 1.0) & (frame.task == task) & (frame.init == init) & (frame["class"] == cls)]
    if bucket:
        frame = frame[frame.size_bucket == bucket]
    per_fold = [np.nanmean(g.dice.to_numpy()) * 100 for _, g in frame.groupby("fold")]
    return float(np.mean(per_fold)), float(np.std(per_fold, ddof=1))


def test_table2_numbers_order_and_missing_fold(config, evaluations, tmp_path):
    out_csv, out_md = tmp_path / "tables" / "table2.csv", tmp_path / "tables" / "table2.md"
    run_report(config, evaluations, out_csv, out_md)
    table = pd.read_csv(out_csv, dtype={"missing_folds": str})

    # every number checked against an independent pandas/numpy computation
    columns = [
        ("brain_tumour", "Tumour S", "whole_tumour", "small"), ("brain_tumour", "Tumour M", "whole_tumour", "medium"),
        ("brain_tumour", "Tumour L", "whole_tumour", "large"), ("brain_tumour", "Tumour all", "whole_tumour", None),
        ("pancreas", "Organ", "organ", None), ("pancreas", "Tumour", "tumour", None),
    ]
    for task, column, cls, bucket in columns:
        for init in ["scratch", "genesis", "sar"]:
            row = table[(table.task == task) & (table.column == column) & (table.init == init)]
            assert len(row) == 1
            mean, std = _expected(evaluations, task, init, cls, bucket)
            assert row["mean"].iloc[0] == pytest.approx(mean, abs=1e-3)
            assert row["std"].iloc[0] == pytest.approx(std, abs=1e-3)
    sar_organ = table[(table.column == "Organ") & (table.init == "sar")].iloc[0]
    assert sar_organ["n_folds"] == 2 and str(sar_organ["missing_folds"]) == "2"
    assert (table[table.init == "scratch"]["n_folds"] == 3).all()

    md = out_md.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Init"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Init", "Tumour S", "Tumour M", "Tumour L", "Tumour all", "Organ", "Tumour"
    ]
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Init")]
    assert [line.split("|")[1].strip() for line in body] == ["Scratch", "Genesis", "SAR"]
    sar_cells = [c.strip() for c in body[2].strip("|").split("|")]
    assert sar_cells[5].startswith("—") and sar_cells[6].startswith("—")  # missing fold: dash, not a number
    assert "[1]" in sar_cells[5] and "[1] SAR, pancreas Organ: no evaluation for fold(s) 2" in md
    mean, std = _expected(evaluations, "brain_tumour", "scratch", "whole_tumour", None)
    assert f"{mean:.2f} ± {std:.2f}" in body[0]
    assert "small < 4000 mm3 <= medium < 16000 mm3 <= large" in md
    assert "brain_tumour** (Tumour S, Tumour M, Tumour L, Tumour all): 3 random trials" in md
    assert "pancreas** (Organ, Tumour): 3 cross-validation folds" in md


def test_absent_task_columns_omitted_and_empty_bucket_footnoted(config, tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for init in ["scratch", "genesis", "sar"]:
        for fold in range(3):
            rows = _brain_rows(init, fold, rng)
            if fold == 1:  # no small tumour among this fold's test cases
                rows = [r for r in rows if r["size_bucket"] != "small"]
            paths.append(_write(tmp_path / "eval", "brain_tumour", init, 1.0, fold, rows))
    out_csv, out_md = tmp_path / "t.csv", tmp_path / "t.md"
    run_report(config, paths, out_csv, out_md)
    table = pd.read_csv(out_csv)
    assert set(table.task) == {"brain_tumour"}
    md = out_md.read_text()
    assert "Organ" not in md
    small = table[(table.column == "Tumour S") & (table.init == "scratch")].iloc[0]
    assert small["n_folds"] == 2
    assert "fold(s) 1 have no test case in this group" in md
