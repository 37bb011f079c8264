"""Splits: disjointness, reproducibility, k-fold coverage, stratification, nested label subsets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sar3d.config import validate_config
from sar3d.io import InputDataError
from sar3d.splits import make_kfold, make_trials, nested_label_subsets, run_split, size_bucket

CASES = [f"case{i:02d}" for i in range(18)]


def assert_disjoint(fold: dict[str, list[str]], cases: list[str]) -> None:
    train, val, test = set(fold["train"]), set(fold["val"]), set(fold["test"])
    assert not train & test and not val & test and not train & val
    assert train | val | test == set(cases)
    assert fold["train"] and fold["val"] and fold["test"]


@pytest.mark.parametrize("fixed_test", [True, False])
def test_trials_disjoint_reproducible_and_different(fixed_test: bool) -> None:
    def draw(seed: int) -> list[dict[str, list[str]]]:
        return make_trials(CASES, 4, 1 / 3, 0.2, np.random.default_rng(seed), fixed_test=fixed_test)

    trials = draw(1)
    for trial in trials:
        assert_disjoint(trial, CASES)
        assert len(trial["test"]) == 6 and len(trial["val"]) == 2
    assert trials == draw(1)
    assert trials != draw(2)
    assert len({tuple(t["train"]) for t in trials}) == len(trials)  # every trial trains differently
    tests = {tuple(t["test"]) for t in trials}
    assert len(tests) == (1 if fixed_test else len(trials))


def test_kfold_tests_every_case_once() -> None:
    cases = CASES[:11]
    folds = make_kfold(cases, 3, 0.2, np.random.default_rng(0))
    tested = [c for fold in folds for c in fold["test"]]
    assert sorted(tested) == sorted(cases)
    assert sorted(len(f["test"]) for f in folds) == [3, 4, 4]
    for fold in folds:
        assert_disjoint(fold, cases)
    assert all(len(f["train"]) == 1 for f in make_kfold(cases[:3], 3, 0.2, np.random.default_rng(0)))
    for n_cases, n_folds in [(2, 2), (3, 4)]:  # no fold may lack a training or validation case
        with pytest.raises(ValueError):
            make_kfold(cases[:n_cases], n_folds, 0.2, np.random.default_rng(0))


def test_stratified_test_sets_hold_every_bucket() -> None:
    # 12 large, 4 medium and 2 small: a plain random third would miss the small bucket in ~45% of draws
    strata = {c: "large" for c in CASES[:12]} | {c: "medium" for c in CASES[12:16]}
    strata |= {c: "small" for c in CASES[16:]}
    for seed in range(20):
        trials = make_trials(CASES, 3, 1 / 3, 0.2, np.random.default_rng(seed), strata, fixed_test=False)
        for trial in trials:
            assert {strata[c] for c in trial["test"]} == {"small", "medium", "large"}
            assert {strata[c] for c in trial["train"] + trial["val"]} == {"small", "medium", "large"}
            assert_disjoint(trial, CASES)


def test_nested_label_subsets() -> None:
    ratios = [1, 0.5, 0.2, 0.1, 0.05, 0.02]
    subsets = nested_label_subsets(CASES, ratios, np.random.default_rng(3))
    assert subsets[1] == sorted(CASES)
    assert [len(subsets[r]) for r in ratios] == [18, 9, 4, 2, 1, 1]
    for big, small in itertools.pairwise(ratios):
        assert set(subsets[small]) <= set(subsets[big])
    assert subsets == nested_label_subsets(CASES, ratios, np.random.default_rng(3))


def test_size_bucket_rule_at_thresholds() -> None:
    t = (4000.0, 16000.0)
    assert size_bucket(0.0, t) == "small"
    assert size_bucket(3999.9, t) == "small"
    assert size_bucket(4000.0, t) == "medium"
    assert size_bucket(15999.9, t) == "medium"
    assert size_bucket(16000.0, t) == "large"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module: creating a store costs seconds."""
    return tmp_path_factory.getbasetemp() / "sar3d-data-results"


def study(results: Path, split: dict[str, Any], buckets: list[float] | None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "dataset": "brats", "normalisation": "zscore_nonzero", "labels": [0, 1],
        "classes": {"whole_tumour": [1]}, "split": split,
    }
    if buckets:
        task["size_buckets_mm3"] = buckets
    return validate_config({
        "seed": 7, "results_dir": str(results), "tracking": {"experiment": "sar3d-tests-data"},
        "datasets": {"brats": {"source": "phantom", "phantom": "brain_mri", "modality": "MRI"}},
        "tasks": {"brain": task},
    })


def write_manifest(folder: Path, volumes: list[float]) -> Path:
    folder.mkdir(parents=True)
    cases = [
        {"case": f"c{i:02d}", "channel": 0, "image": f"images/c{i:02d}.nii.gz", "label": f"labels/c{i:02d}.nii.gz",
         "shape": [8, 8, 8], "foreground_mm3": {"whole_tumour": v}}
        for i, v in enumerate(volumes)
    ]
    manifest = {"purpose": "task", "dataset": "brats", "task": "brain", "modality": "MRI",
                "spacing": [1.0, 1.0, 1.0], "cases": cases}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def read_folds(out: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"fold{k}.json").read_text()) for k in range(n)]


def test_run_split_files(tmp_path: Path, results: Path) -> None:
    volumes = [100.0] * 4 + [5000.0] * 4 + [20000.0] * 4
    data = write_manifest(tmp_path / "pre", volumes)
    config = study(results, {"kind": "trials", "n": 3, "fixed_test": False}, [4000, 16000])
    run_split(config, "brain", data, tmp_path / "a")
    run_split(config, "brain", data, tmp_path / "b")
    folds = read_folds(tmp_path / "a", 3)
    assert folds == read_folds(tmp_path / "b", 3)  # same config -> same files
    cases = [f"c{i:02d}" for i in range(12)]
    for k, fold in enumerate(folds):
        assert (fold["task"], fold["fold"], fold["kind"], fold["seed"]) == ("brain", k, "trials", 7)
        assert_disjoint(fold, cases)
        assert {volumes[int(c[1:])] for c in fold["test"]} == {100.0, 5000.0, 20000.0}
    heldout = json.loads((tmp_path / "a" / "heldout.json").read_text())
    assert heldout == {"task": "brain", "dataset": "brats",
                       "cases": sorted({c for f in folds for c in f["test"]})}

    config = study(results, {"kind": "kfold", "n": 3}, None)
    run_split(config, "brain", data, tmp_path / "k")
    folds = read_folds(tmp_path / "k", 3)
    assert sorted(c for f in folds for c in f["test"]) == cases
    assert json.loads((tmp_path / "k" / "heldout.json").read_text())["cases"] == cases


def test_run_split_refuses_too_few_cases(tmp_path: Path, results: Path) -> None:
    data = write_manifest(tmp_path / "pre", [1.0, 2.0])
    with pytest.raises(InputDataError) as err:
        run_split(study(results, {"kind": "kfold", "n": 2}, None), "brain", data, tmp_path / "out")
    assert err.value.path == data / "manifest.json"
    assert not (tmp_path / "out").exists()
