"""`sar3d compare`: a small store filled here, listed side by side, latest run per job, fold means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from sar3d.cli import main
from sar3d.tracking import init_tracking, tracked_run

DICE = {("scratch", 0): 0.5, ("scratch", 1): 0.7, ("sar", 0): 0.6, ("sar", 1): 0.8}


@pytest.fixture
def filled(tracked_config: dict[str, Any], tmp_path: Path) -> Path:
    """A study store with pre-training, evaluation runs and one evaluation rerun; returns its config file."""
    config = tracked_config
    init_tracking(config)
    with tracked_run(config, "pretrain", {"method": "sar"}) as run:
        run.metrics({"final/best_score": 0.1})
    with tracked_run(config, "evaluate", {"task": "pancreas", "init": "sar", "ratio": 1.0, "fold": 1}) as run:
        run.metrics({"dice/organ": 0.1})  # superseded by the rerun below
    for (init, fold), dice in DICE.items():
        with tracked_run(config, "evaluate", {"task": "pancreas", "init": init, "ratio": 1.0, "fold": fold}) as run:
            run.metrics({"dice/organ": dice, "hd95_mm/organ": 10 * dice})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_prints_latest_runs_side_by_side_and_writes_csv(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.csv"
    args = ["--stages", "evaluate", "--metrics", "dice/*", "--csv", str(out)]
    assert main(["compare", "--config", str(filled), *args]) == 0
    printed = capsys.readouterr().out
    assert "== evaluate (4 runs) ==" in printed and "hd95" not in printed and "pretrain" not in printed
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == ["stage", "task", "init", "ratio", "fold"]
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    got = table.set_index(["init", "fold"])["dice/organ"].to_dict()
    assert got == DICE  # the first sar/fold1 run (0.1) was replaced by its rerun


def test_compare_mean_over_folds_and_all_runs(filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "mean.csv"
    assert main(["compare", "--config", str(filled), "--stages", "evaluate", "--mean", "--csv", str(out)]) == 0
    means = pd.read_csv(out).set_index("init")
    assert means.loc["sar", "n"] == 2
    assert means.loc["sar", "dice/organ:mean"] == pytest.approx(0.7)
    assert means.loc["scratch", "dice/organ:std"] == pytest.approx(0.1414, abs=1e-4)
    every = tmp_path / "every.csv"
    assert main(["compare", "--config", str(filled), "--all-runs", "--csv", str(every)]) == 0
    assert sorted(pd.read_csv(every)["stage"]) == ["evaluate"] * 5 + ["pretrain"]


def test_compare_names_a_missing_experiment(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(filled.read_text())
    config["tracking"]["experiment"] = "no-such-study"
    filled.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(filled)]) == 2
    assert "no experiment 'no-such-study'" in capsys.readouterr().err
