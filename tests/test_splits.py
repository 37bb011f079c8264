"""Splits: disjointness, reproducibility, k-fold coverage, stratification, nested label subsets, size buckets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sar3d.config import validate_config
from sar3d.data.splits import make_kfold, make_trials, nested_label_subsets, run_split, size_bucket
from sar3d.io import InputDataError

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


def study(results: Path, split: dict[str, Any], buckets: list[float] | str | None) -> dict[str, Any]:
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
    record = json.loads((tmp_path / "a" / "size_buckets.json").read_text())
    assert record["thresholds_mm3"] == [4000, 16000] and record["how"] == "set in the config"
    assert all(f["size_buckets_mm3"] == [4000, 16000] for f in folds)

    config = study(results, {"kind": "kfold", "n": 3}, None)
    run_split(config, "brain", data, tmp_path / "k")
    folds = read_folds(tmp_path / "k", 3)
    assert sorted(c for f in folds for c in f["test"]) == cases
    assert json.loads((tmp_path / "k" / "heldout.json").read_text())["cases"] == cases
    assert not (tmp_path / "k" / "size_buckets.json").exists() and folds[0]["size_buckets_mm3"] is None


def test_run_split_refuses_too_few_cases(tmp_path: Path, results: Path) -> None:
    data = write_manifest(tmp_path / "pre", [1.0, 2.0])
    with pytest.raises(InputDataError) as err:
        run_split(study(results, {"kind": "kfold", "n": 2}, None), "brain", data, tmp_path / "out")
    assert err.value.path == data / "manifest.json"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- size_buckets_mm3: auto


def bucket_counts(volumes: list[float], thresholds: list[float]) -> dict[str, int]:
    buckets = [size_bucket(v, thresholds) for v in volumes]
    return {b: buckets.count(b) for b in ("small", "medium", "large")}


def check_auto_split(out: Path, volumes: list[float], n: int) -> dict[str, Any]:
    """Every trial tests every bucket; the thresholds cut the never-tested cases into thirds; all recorded."""
    record = json.loads((out / "size_buckets.json").read_text())
    thresholds = record["thresholds_mm3"]
    folds = read_folds(out, n)
    by_case = {f"c{i:02d}": v for i, v in enumerate(volumes)}
    for fold in folds:
        assert fold["size_buckets_mm3"] == thresholds
        counts = bucket_counts([by_case[c] for c in fold["test"]], thresholds)
        assert min(counts.values()) >= 1, (fold["fold"], counts, thresholds)
    heldout = set(json.loads((out / "heldout.json").read_text())["cases"])
    basis = record["basis_cases"]
    assert set(basis) == set(by_case) - heldout and len(basis) >= 3  # never a test case, and all of those
    counts = bucket_counts([by_case[c] for c in basis], thresholds)
    assert all(abs(k - len(basis) / 3) < 1 for k in counts.values()), counts  # tertiles of the basis
    assert record["how"] == f"auto: tertiles of the {len(basis)} cases that are never test cases"
    assert record["rule"] == f"small < {thresholds[0]:g} mm3 <= medium < {thresholds[1]:g} mm3 <= large"
    return record


@pytest.mark.parametrize("fixed_test", [True, False])
def test_auto_buckets_fit_tumours_from_1e3_to_1e5_mm3(tmp_path: Path, fixed_test: bool) -> None:
    # BraTS-like whole tumours: log-normal around 3e4 mm3, clipped to 10^3..10^5. Fixed phantom
    # thresholds (4000, 16000) would leave "small" with a few cases at most.
    rng = np.random.default_rng(11)
    volumes = np.clip(np.exp(rng.normal(np.log(3e4), 1.0, 45)), 1e3, 1e5).tolist()
    assert bucket_counts(volumes, [4000, 16000])["small"] <= 4
    data = write_manifest(tmp_path / "pre", volumes)
    own = tmp_path / "results"  # a store of its own: a failed split run elsewhere would be resumed
    config = study(own, {"kind": "trials", "n": 3, "fixed_test": fixed_test}, "auto")
    run_split(config, "brain", data, tmp_path / "out")
    record = check_auto_split(tmp_path / "out", volumes, 3)
    assert record["setting"] == "auto"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{own.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("sar3d-tests-data")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'split'")
    assert run.data.params["size_buckets_mm3"] == "auto"
    assert run.data.metrics["size_buckets_mm3/small_medium"] == pytest.approx(record["thresholds_mm3"][0])
    assert run.data.metrics["size_buckets_mm3/medium_large"] == pytest.approx(record["thresholds_mm3"][1])
    assert run.data.tags["size_bucket_rule"] == record["rule"]


def test_auto_buckets_every_bucket_tested_over_many_seeds() -> None:
    """The guarantee is by construction, not luck: log-uniform 10^3..10^5, few cases, any seed."""
    from sar3d.data.splits import auto_bucket_folds, never_tested, tested_per_bucket

    for n_cases in (6, 9, 18):
        cases = CASES[:n_cases]
        volumes = dict(zip(cases, 10 ** np.random.default_rng(5).uniform(3, 5, n_cases), strict=True))
        split = {"kind": "trials", "n": 5, "test_fraction": 1 / 3, "val_fraction": 0.2, "fixed_test": True}
        draws = []
        for seed in range(30):
            folds, thresholds, n_draws = auto_bucket_folds(cases, split, volumes, np.random.default_rng(seed))
            draws.append(n_draws)
            assert all(min(c.values()) >= 1 for c in tested_per_bucket(folds, volumes, thresholds))
            basis = [volumes[c] for c in never_tested(cases, folds)]
            assert thresholds == pytest.approx(np.quantile(basis, [1 / 3, 2 / 3]).tolist())
        if n_cases < 18:  # with few cases the first stratified draw often misses a bucket: the redraw matters
            assert max(draws) > 1


def test_auto_buckets_on_the_default_study_phantom(tmp_path: Path, results: Path) -> None:
    """The default study's brain task (18 phantom cases, 3 trials) as normalisation measures it."""
    from sar3d.data.normalise import class_volumes_mm3
    from sar3d.data.phantom import generate_case
    from tinystudy import REPO

    default = yaml.safe_load((REPO / "config.yaml").read_text())
    task = default["tasks"]["brain_tumour"]
    assert task["size_buckets_mm3"] == "auto"
    n_cases = default["datasets"]["brats"]["n_cases"]
    volumes = []
    for index in range(n_cases):
        _, label, affine = generate_case("brain_mri", default["seed"], index)
        volumes.append(class_volumes_mm3(label, affine, task["classes"])["whole_tumour"])
    assert max(volumes) / min(volumes) > 30  # two orders of magnitude, like 10^3..10^5
    data = write_manifest(tmp_path / "pre", volumes)
    config = study(results, task["split"], "auto")
    run_split(config, "brain", data, tmp_path / "out")
    check_auto_split(tmp_path / "out", volumes, task["split"]["n"])


def test_auto_buckets_refused_where_they_cannot_work(tmp_path: Path, results: Path) -> None:
    from sar3d.config import ConfigError

    with pytest.raises(ConfigError, match=r"size_buckets_mm3.*k-fold tests every case"):
        study(results, {"kind": "kfold", "n": 3}, "auto")
    with pytest.raises(ConfigError, match="thresholds must increase"):
        study(results, {"kind": "trials", "n": 3}, [16000, 4000])
    data = write_manifest(tmp_path / "pre", [5000.0] * 12)  # equal volumes: no tertiles
    with pytest.raises(InputDataError, match="do not separate three size buckets") as err:
        run_split(study(results, {"kind": "trials", "n": 3}, "auto"), "brain", data, tmp_path / "out")
    assert err.value.path == data / "manifest.json"
