"""Tables 2-4 from hand-written evaluation CSVs: numbers, order, buckets, missing cells, best mark, statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sar3d.config import load_config
from sar3d.evaluation.run import CSV_COLUMNS
from sar3d.reporting.report import run_report
from tinystudy import unit_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(store: Path) -> dict[str, Any]:
    return unit_config(
        store,
        "report-tests",
        {
            "finetune": {"full_label_inits": [],
                     "inits": ["scratch", "genesis", "sar"], "ablation_inits": [], "label_ratios": [1]},
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


def _first_table_body(md: str) -> list[str]:
    """Body rows of the first Markdown table (the values; the comparison table follows)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Init")) + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("| "))
    return lines[start:end]


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
    body = _first_table_body(md)
    assert [line.split("|")[1].strip() for line in body] == ["Scratch", "Genesis", "SAR"]
    sar_cells = [c.strip() for c in body[2].strip("|").split("|")]
    assert sar_cells[5].startswith("—") and sar_cells[6].startswith("—")  # missing fold: dash, not a number
    assert "[1]" in sar_cells[5] and "[1] SAR, pancreas Organ: no evaluation for fold(s) 2" in md
    mean, std = _expected(evaluations, "brain_tumour", "scratch", "whole_tumour", None)
    assert f"{mean:.2f} ± {std:.2f}" in body[0]
    # auto size buckets with no split run under this results folder: said, not invented
    assert "Size buckets by reference whole_tumour volume: tertiles of the cases never tested, not known here" in md
    assert "brain_tumour** (Tumour S, Tumour M, Tumour L, Tumour all): 3 random trials" in md
    assert "pancreas** (Organ, Tumour): 3 cross-validation folds" in md


def test_absent_task_is_dashed_and_empty_bucket_footnoted(config, tmp_path):
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
    table = pd.read_csv(out_csv, dtype={"missing_folds": str}, keep_default_na=False, na_values=[""])
    organ = table[table.column == "Organ"]
    assert len(organ) == 3 and organ["mean"].isna().all() and (organ["missing_folds"] == "0 1 2").all()
    md = out_md.read_text()
    organ_col = _first_table_body(md)[0].strip("|").split("|")[5]
    assert organ_col.strip().startswith("—")  # a task whose jobs all failed is dashed, not dropped
    assert "Scratch, pancreas Organ: no evaluation for fold(s) 0 1 2" in md
    small = table[(table.column == "Tumour S") & (table.init == "scratch")].iloc[0]
    assert small["n_folds"] == 2
    assert "fold(s) 1 have no test case with a value in this group" in md


# --------------------------------------------------------------------------- best cell, statistics, run ids

FOLD_DICE = {"scratch": [0.70, 0.74, 0.72], "genesis": [0.78, 0.80, 0.77], "sar": [0.81, 0.83, 0.80]}


def _constant_rows(task: str, dice: float) -> list[dict[str, Any]]:
    """Every case of a fold with the same Dice, so the per-fold mean is known exactly."""
    if task == "brain_tumour":
        return [{"case": f"b{i}", "class": "whole_tumour", "dice": dice, "hd95_mm": 10 * (1 - dice),
                 "size_bucket": b} for i, b in enumerate(["small", "medium", "large"])]
    return [{"case": "p0", "class": cls, "dice": dice * f, "hd95_mm": 5.0, "size_bucket": ""}
            for cls, f in [("organ", 1.0), ("tumour", 0.5)]]


def _grid(folder: Path, config: dict[str, Any], skip: set[tuple[str, str, int]] = frozenset(),
          ratios: tuple[float, ...] = (1.0,), fold_dice: dict[str, list[float]] = FOLD_DICE) -> list[Path]:
    files = []
    for init, per_fold in fold_dice.items():
        for task in ("brain_tumour", "pancreas"):
            for ratio in ratios:
                for fold, dice in enumerate(per_fold):
                    if (task, init, fold) not in skip:
                        files.append(_write(folder, task, init, ratio, fold, _constant_rows(task, dice * ratio)))
    return files


def test_best_flag_t_test_and_bootstrap(config, tmp_path):
    from scipy import stats

    from sar3d.reporting.evaluations import read_grid
    from sar3d.reporting.report import write_table

    # genesis misses fold 2 of the brain task; its value must not win a column, even if higher
    fold_dice = {**FOLD_DICE, "genesis": [0.95, 0.96, 0.97]}
    files = _grid(tmp_path / "eval", config, skip={("brain_tumour", "genesis", 2)}, fold_dice=fold_dice)
    grid = read_grid(config, files)
    table = write_table(config, "table2", grid, tmp_path / "t2.csv", tmp_path / "t2.md")
    again = write_table(config, "table2", grid, tmp_path / "t2b.csv", tmp_path / "t2b.md")
    assert (tmp_path / "t2.csv").read_text() == (tmp_path / "t2b.csv").read_text()  # seeded bootstrap
    assert again.equals(table)

    brain_all = table[table.column == "Tumour all"].set_index("init")
    assert brain_all.loc["sar", "best"] and not brain_all.loc["genesis", "best"]
    assert brain_all.loc["genesis", "mean"] == pytest.approx(95.5)  # over the 2 folds present
    assert table[table.column == "Organ"].set_index("init").loc["genesis", "best"]  # complete there

    sar, scratch = np.array(FOLD_DICE["sar"]) * 100, np.array(FOLD_DICE["scratch"]) * 100
    row = brain_all.loc["scratch"]
    assert row["mean_diff"] == pytest.approx(sar.mean() - scratch.mean())
    assert row["p_value"] == pytest.approx(stats.ttest_ind(sar, scratch, equal_var=False).pvalue)
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
    # independent resampling: any bootstrap difference lies in [min(sar) - max(scratch), max(sar) - min(scratch)]
    assert sar.min() - scratch.max() - 1e-9 <= row["ci_low"] and row["ci_high"] <= sar.max() - scratch.min() + 1e-9
    assert np.isnan(brain_all.loc["sar", "p_value"])  # the reference is not compared with itself
    genesis = np.array([95.0, 96.0])  # the two folds present are compared
    assert brain_all.loc["genesis", "p_value"] == pytest.approx(stats.ttest_ind(sar, genesis, equal_var=False).pvalue)

    md = (tmp_path / "t2.md").read_text()
    sar_line = next(line for line in _first_table_body(md) if line.startswith("| SAR "))
    assert f"**{sar.mean():.2f} ± {sar.std(ddof=1):.2f}**" in sar_line
    assert "## SAR vs each other initialisation" in md and "Welch's" in md
    p = stats.ttest_ind(sar, scratch, equal_var=False).pvalue
    assert f"Δ {sar.mean() - scratch.mean():+.2f} [" in md and (f"p {p:.3f}" in md or "p < 0.001" in md)

    # every init is also compared with the baseline (scratch), with the sign "init - scratch"
    vs_scratch = brain_all.loc["sar"]
    assert vs_scratch["mean_diff_vs_scratch"] == pytest.approx(sar.mean() - scratch.mean())
    assert vs_scratch["p_value_vs_scratch"] == pytest.approx(row["p_value"])
    assert vs_scratch["ci_low_vs_scratch"] <= vs_scratch["mean_diff_vs_scratch"] <= vs_scratch["ci_high_vs_scratch"]
    assert brain_all.loc["genesis", "p_value_vs_scratch"] == pytest.approx(
        stats.ttest_ind(genesis, scratch, equal_var=False).pvalue)
    assert np.isnan(brain_all.loc["scratch", "p_value_vs_scratch"])
    assert "## Each initialisation vs Scratch" in md and "Δ = mean(row) − mean(Scratch)" in md

    hd = write_table(config, "table2_hd95", grid, tmp_path / "h.csv", tmp_path / "h.md")
    hd_all = hd[hd.column == "Tumour all"].set_index("init")
    assert hd_all.loc["sar", "best"]  # lowest distance wins
    assert hd_all.loc["scratch", "mean"] == pytest.approx(np.mean([10 * (1 - d) for d in FOLD_DICE["scratch"]]))


def test_partial_grid_from_existing_files_with_run_ids(config, tmp_path):
    from sar3d.reporting.evaluations import read_grid
    from sar3d.reporting.report import write_table
    from sar3d.tracking import tracked_run

    config = {**config, "results_dir": str(tmp_path / "results")}
    eval_dir = tmp_path / "results" / "eval"
    files = _grid(eval_dir, config, skip={("pancreas", "sar", 1)})
    for f in files:  # the sidecar that evaluation writes, with its run id
        f.with_suffix(".json").write_text(json.dumps({"mlflow_run_id": f"run-{f.parent.parent.name}-{f.stem}"}))
    identity = {"task": "pancreas", "init": "scratch", "ratio": 1.0, "fold": 0}
    with tracked_run(config, "finetune", identity, params={}) as run:
        finetune_id = run.run_id

    grid = read_grid(config)  # no file list: whichever expected files exist
    table = write_table(config, "table2", grid, tmp_path / "t.csv", tmp_path / "t.md")
    organ = table[table.column == "Organ"].set_index("init")
    assert organ.loc["sar", "missing_folds"] == "1" and organ.loc["sar", "n_folds"] == 2
    assert organ.loc["scratch", "eval_run_ids"] == "run-scratch-fold0 run-scratch-fold1 run-scratch-fold2"
    assert organ.loc["scratch", "finetune_run_ids"].split() == [finetune_id, "-", "-"]
    md = (tmp_path / "t.md").read_text()
    assert "SAR, pancreas Organ: no evaluation for fold(s) 1" in md


def test_table3_only_when_configured_and_table4_with_figure(config, tmp_path):
    from sar3d.grid import configured_tables
    from sar3d.reporting.evaluations import read_grid
    from sar3d.reporting.report import write_table

    assert "table3" not in configured_tables(config)
    ablation = load_config(REPO / "config.yaml", {
        "results_dir": config["results_dir"], "tracking": config["tracking"],
        "finetune": {"full_label_inits": [],
                     "inits": ["scratch", "sar"], "ablation_inits": ["sar_s2", "sar_s8"], "label_ratios": [1, 0.5]},
        "tasks": {"brain_tumour": {"split": {"n": 3}}, "pancreas": {"split": {"n": 3}}},
    })
    assert configured_tables(ablation) == ["table2", "table2_hd95", "table3", "table4"]
    fold_dice = {"scratch": FOLD_DICE["scratch"], "sar_s2": [0.75, 0.76, 0.77], "sar_s8": [0.6, 0.61, 0.62],
                 "sar": FOLD_DICE["sar"]}
    grid = read_grid(ablation, _grid(tmp_path / "eval", ablation, ratios=(1.0, 0.5), fold_dice=fold_dice))

    t3 = write_table(ablation, "table3", grid, tmp_path / "t3.csv", tmp_path / "t3.md")
    assert list(dict.fromkeys(t3.init)) == ["sar_s2", "sar_s8", "sar"] and set(t3.task) == {"brain_tumour"}
    body = _first_table_body((tmp_path / "t3.md").read_text())
    assert [line.split("|")[1].strip() for line in body] == ["SAR (1/2 only)", "SAR (1/8 only)", "SAR"]
    t2 = write_table(ablation, "table2", grid, tmp_path / "t2.csv", tmp_path / "t2.md")
    assert set(t2.init) == {"scratch", "sar"}  # single-scale ablations belong to Table 3

    out_csv, out_md = tmp_path / "t4.csv", tmp_path / "t4.md"
    figs = [tmp_path / "fig" / "t4.png", tmp_path / "fig" / "t4.svg"]
    run_report(ablation, None, out_csv, out_md, table="table4", figure=figs)  # nothing under results: all dashes
    assert pd.read_csv(out_csv)["mean"].isna().all()
    t4 = write_table(ablation, "table4", grid, out_csv, out_md)
    assert list(dict.fromkeys(t4.column)) == ["Tumour all 1", "Tumour all 1/2", "Average 1", "Average 1/2"]
    avg = t4[(t4.column == "Average 1/2") & (t4.init == "sar")].iloc[0]
    per_fold = [100 * (d * 0.5 + d * 0.5 * 0.5) / 2 for d in FOLD_DICE["sar"]]  # mean of organ and tumour
    assert avg["mean"] == pytest.approx(np.mean(per_fold)) and avg["std"] == pytest.approx(np.std(per_fold, ddof=1))
    for fig in figs:
        assert fig.stat().st_size > 1000
    assert figs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bucket_footnotes_give_the_splits_thresholds(config, tmp_path):
    """Tables 2 and 3 state the auto thresholds the split computed and how; the report run logs them."""
    import mlflow

    from sar3d.data.splits import run_split
    from sar3d.reporting.evaluations import read_grid
    from sar3d.reporting.report import write_table

    results = tmp_path / "results"
    ablation = load_config(REPO / "config.yaml", {
        "results_dir": str(results), "tracking": config["tracking"],
        "finetune": {"full_label_inits": [],
                     "inits": ["scratch", "sar"], "ablation_inits": ["sar_s2"], "label_ratios": [1]},
        "tasks": {"brain_tumour": {"split": {"n": 3}}, "pancreas": {"split": {"n": 3}}},
    })
    assert ablation["tasks"]["brain_tumour"]["size_buckets_mm3"] == "auto"  # the default
    volumes = 10 ** np.random.default_rng(2).uniform(3, 5, 18)
    data = tmp_path / "pre"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "purpose": "task", "dataset": "brats", "task": "brain_tumour", "modality": "MRI", "spacing": [1, 1, 1],
        "cases": [{"case": f"c{i:02d}", "foreground_mm3": {"whole_tumour": float(v)}} for i, v in enumerate(volumes)],
    }))
    run_split(ablation, "brain_tumour", data, results / "splits" / "brain_tumour")
    record = json.loads((results / "splits" / "brain_tumour" / "size_buckets.json").read_text())
    t0, t1 = record["thresholds_mm3"]
    expected = (f"Size buckets by reference whole_tumour volume: small < {t0:g} mm3 <= medium < {t1:g} mm3 <= "
                "large (auto: tertiles of the 12 cases that are never test cases).")

    fold_dice = {"scratch": FOLD_DICE["scratch"], "sar_s2": [0.75, 0.76, 0.77], "sar": FOLD_DICE["sar"]}
    files = _grid(tmp_path / "eval", ablation, fold_dice=fold_dice)
    grid = read_grid(ablation, files)
    for name in ("table2", "table3"):
        write_table(ablation, name, grid, tmp_path / f"{name}.csv", tmp_path / f"{name}.md")
        assert expected in (tmp_path / f"{name}.md").read_text(), name

    run_report(ablation, files, tmp_path / "r.csv", tmp_path / "r.md", table="table3")
    client = mlflow.MlflowClient(tracking_uri=ablation["tracking"]["uri"])
    experiment = client.get_experiment_by_name(ablation["tracking"]["experiment"])
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'report' and tags.table = 'table3'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert run.data.params["size_buckets.brain_tumour"] == expected
