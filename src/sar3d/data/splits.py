"""Train/validation/test splits of a downstream task (paper section 3.2).

* ``trials`` (brain tumour): ``n`` trials of a random 2:1 train/test division.
  With ``fixed_test`` (default) one test set is drawn and shared by every trial,
  which is what the paper's Table 1 implies (190 of the 285 BraTS cases, i.e.
  exactly the 2/3 training part, are used for pre-training), and the trials
  differ in their train/validation division; otherwise every trial draws its own
  test set.
* ``kfold`` (pancreas): ``n``-fold cross-validation, every case tested once.

Deviation from the paper's plain random division: when a task defines
``size_buckets_mm3`` the test draw is stratified by the size bucket of the first
class, so every test set holds small, medium and large tumours and the per-size
Dice of Table 2 is defined in every trial.

``size_buckets_mm3: auto`` fits the buckets to the data instead of a fixed pair of
thresholds: they are the tertiles of the first class's volume over the cases that
are never test cases (the thresholds must not be tuned on test cases). The test
draw cannot wait for them, so it is stratified by the tertiles over all cases and
repeated from the same seeded generator until every size bucket of every fold
holds a test case under the final thresholds (a restricted randomisation; the
number of draws is recorded). ``size_buckets.json`` records the thresholds, how
they were computed and the test cases per bucket; every fold file carries them.

In every fold a fraction of the *training* cases (at least one) becomes the
validation set that drives learning-rate decay and early stopping; test cases
never serve for model selection. The union of all test sets is written to
``heldout.json`` so that pre-training never sees a downstream test case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sar3d import paths
from sar3d.io import InputDataError, read_json, write_json
from sar3d.seeding import numpy_rng
from sar3d.tracking import tracked_run

SIZE_BUCKETS = ("small", "medium", "large")
AUTO = "auto"  # size_buckets_mm3: tertiles of the never-tested cases' volumes
AUTO_MAX_DRAWS = 100


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() sends 2.5 to 2)."""
    return math.floor(x + 0.5)


def size_bucket(volume_mm3: float, thresholds: Sequence[float]) -> str:
    """Size bucket of a tumour: ``small < t0 <= medium < t1 <= large``."""
    t0, t1 = thresholds
    if volume_mm3 < t0:
        return "small"
    if volume_mm3 < t1:
        return "medium"
    return "large"


def bucket_rule(thresholds: Sequence[float]) -> str:
    """Human-readable size-bucket rule, as written to the splits folder, the evaluations and the tables."""
    t0, t1 = thresholds
    return f"small < {t0:g} mm3 <= medium < {t1:g} mm3 <= large"


def _shuffled(cases: Sequence[str], rng: np.random.Generator) -> list[str]:
    return [cases[i] for i in rng.permutation(len(cases))]


def _split_val(train: Sequence[str], val_fraction: float, rng: np.random.Generator) -> dict[str, list[str]]:
    """Move ``val_fraction`` of the training cases (at least one, leaving one) to validation."""
    if len(train) < 2:
        raise ValueError(f"need at least 2 training cases to hold one out for validation, got {len(train)}")
    n_val = min(max(1, round_half_up(val_fraction * len(train))), len(train) - 1)
    order = _shuffled(sorted(train), rng)
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def _draw_test(
    cases: Sequence[str], test_fraction: float, rng: np.random.Generator, strata: Mapping[str, str] | None
) -> list[str]:
    """A random test set; per stratum when ``strata`` is given (>= 1 per stratum, >= 1 left per stratum)."""
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        groups.setdefault(strata[case] if strata else "", []).append(case)
    test: list[str] = []
    for key in sorted(groups):
        members = groups[key]
        n = len(members)
        n_test = max(1, round_half_up(test_fraction * n))
        n_test = min(n_test, max(n - 1, 1)) if strata else min(n_test, n - 2)
        test.extend(_shuffled(members, rng)[:n_test])
    return sorted(test)


def make_trials(
    cases: Sequence[str],
    n: int,
    test_fraction: float,
    val_fraction: float,
    rng: np.random.Generator,
    strata: Mapping[str, str] | None = None,
    fixed_test: bool = False,
) -> list[dict[str, list[str]]]:
    """``n`` random train/val/test divisions (``fixed_test``: one test set shared by all)."""
    cases = sorted(set(cases))
    if len(cases) < 3:
        raise ValueError(f"need at least 3 cases for train/val/test, got {len(cases)}")
    missing = sorted(set(cases) - set(strata)) if strata is not None else []
    if missing:
        raise ValueError(f"no stratum for cases {missing}")
    shared = _draw_test(cases, test_fraction, rng, strata) if fixed_test else None
    trials = []
    for _ in range(n):
        test = shared if shared is not None else _draw_test(cases, test_fraction, rng, strata)
        rest = [c for c in cases if c not in set(test)]
        trials.append({**_split_val(rest, val_fraction, rng), "test": list(test)})
    return trials


def make_kfold(
    cases: Sequence[str], n: int, val_fraction: float, rng: np.random.Generator
) -> list[dict[str, list[str]]]:
    """``n``-fold cross-validation: every case is a test case in exactly one fold."""
    cases = sorted(set(cases))
    if n < 2 or len(cases) < n or len(cases) - math.ceil(len(cases) / n) < 2:
        raise ValueError(f"cannot make {n} folds (each with >= 2 training cases) from {len(cases)} cases")
    folds = np.array_split(np.asarray(_shuffled(cases, rng), dtype=object), n)
    out = []
    for k in range(n):
        test = sorted(folds[k].tolist())
        rest = [c for c in cases if c not in set(test)]
        out.append({**_split_val(rest, val_fraction, rng), "test": test})
    return out


def nested_label_subsets(
    train_cases: Sequence[str], ratios: Sequence[float], rng: np.random.Generator
) -> dict[float, list[str]]:
    """Nested subsets of a fold's training (or validation) cases for the label-ratio study (1/2 ⊇ 1/5 ⊇ ...).

    One random order is drawn and every ratio takes its prefix, so a smaller
    subset is always contained in a larger one; each holds at least one case.
    """
    cases = sorted(set(train_cases))
    if not cases:
        raise ValueError("no cases to take label-ratio subsets of")
    order = _shuffled(cases, rng)
    out = {}
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise ValueError(f"label ratio {ratio} outside (0, 1]")
        out[ratio] = sorted(order[: max(1, round_half_up(ratio * len(cases)))])
    return out


def bucket_volumes(manifest: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, float] | None:
    """Volume (mm3) of the first evaluated class per case, or None when the task has no buckets."""
    if not spec.get("size_buckets_mm3"):
        return None
    first_class = next(iter(spec["classes"]))
    volumes = {}
    for entry in manifest["cases"]:
        volume = entry.get("foreground_mm3", {}).get(first_class)
        if volume is None:
            raise KeyError(f"case '{entry['case']}' has no foreground volume of class '{first_class}'")
        volumes[entry["case"]] = float(volume)
    return volumes


def case_strata(volumes: Mapping[str, float], thresholds: Sequence[float]) -> dict[str, str]:
    """Size bucket of every case."""
    return {case: size_bucket(v, thresholds) for case, v in volumes.items()}


def tertile_thresholds(volumes: Sequence[float]) -> list[float]:
    """The two volumes that cut ``volumes`` into thirds (linear-interpolated quantiles 1/3, 2/3)."""
    if len(volumes) < 3:
        raise ValueError(f"tertile size buckets need the volumes of at least 3 cases, got {len(volumes)}")
    t0, t1 = (float(t) for t in np.quantile(np.asarray(volumes, dtype=float), [1 / 3, 2 / 3]))
    if not 0 < t0 < t1:
        raise ValueError(
            f"the tertiles {t0:g} and {t1:g} mm3 do not separate three size buckets (too many equal or zero "
            "volumes); set explicit size_buckets_mm3"
        )
    return [t0, t1]


def never_tested(cases: Sequence[str], folds: Sequence[Mapping[str, list[str]]]) -> list[str]:
    """Cases that are a test case in no fold."""
    tested = {c for fold in folds for c in fold["test"]}
    return sorted(c for c in cases if c not in tested)


def tested_per_bucket(
    folds: Sequence[Mapping[str, list[str]]], volumes: Mapping[str, float], thresholds: Sequence[float]
) -> list[dict[str, int]]:
    """Test cases per size bucket, per fold."""
    return [
        {b: sum(size_bucket(volumes[c], thresholds) == b for c in fold["test"]) for b in SIZE_BUCKETS}
        for fold in folds
    ]


def draw_folds(
    cases: Sequence[str], split: Mapping[str, Any], rng: np.random.Generator, strata: Mapping[str, str] | None
) -> list[dict[str, list[str]]]:
    """The trials or k folds a task's ``split`` config asks for."""
    if split["kind"] == "trials":
        return make_trials(
            cases, split["n"], split["test_fraction"], split["val_fraction"], rng, strata,
            fixed_test=split["fixed_test"],
        )
    return make_kfold(cases, split["n"], split["val_fraction"], rng)


def auto_bucket_folds(
    cases: Sequence[str], split: Mapping[str, Any], volumes: Mapping[str, float], rng: np.random.Generator,
    max_draws: int = AUTO_MAX_DRAWS,
) -> tuple[list[dict[str, list[str]]], list[float], int]:
    """Folds and tertile thresholds of the never-tested cases, every bucket of every fold with a test case.

    Returns the folds, the thresholds and how many draws it took.
    """
    provisional = case_strata(volumes, tertile_thresholds([volumes[c] for c in cases]))
    reason = ""
    for draw in range(1, max_draws + 1):
        folds = draw_folds(cases, split, rng, provisional)
        try:
            thresholds = tertile_thresholds([volumes[c] for c in never_tested(cases, folds)])
        except ValueError as err:  # too few never-tested cases in this draw
            reason = str(err)
            continue
        if all(min(counts.values()) > 0 for counts in tested_per_bucket(folds, volumes, thresholds)):
            return folds, thresholds, draw
        reason = "a size bucket without test cases"
    raise ValueError(
        f"none of {max_draws} stratified draws gives tertiles of the never-tested cases with a test case in every "
        f"size bucket of every fold (last draw: {reason}); set explicit size_buckets_mm3, fewer trials or fixed_test"
    )


def resolve_buckets(
    cases: Sequence[str], spec: Mapping[str, Any], volumes: Mapping[str, float] | None, rng: np.random.Generator
) -> tuple[list[dict[str, list[str]]], dict[str, Any] | None]:
    """The folds of a task and, for a bucketed task, the record of its size buckets (``size_buckets.json``)."""
    setting = spec.get("size_buckets_mm3")
    if volumes is None:
        return draw_folds(cases, spec["split"], rng, None), None
    if setting == AUTO:
        folds, thresholds, draws = auto_bucket_folds(cases, spec["split"], volumes, rng)
        basis = never_tested(cases, folds)
        how = f"auto: tertiles of the {len(basis)} cases that are never test cases"
    else:
        thresholds, draws, basis = [float(t) for t in setting], 1, []
        folds = draw_folds(cases, spec["split"], rng, case_strata(volumes, thresholds))
        how = "set in the config"
    record = {
        "class": next(iter(spec["classes"])), "setting": setting, "thresholds_mm3": thresholds,
        "how": how, "basis_cases": basis, "draws": draws,
        "test_cases_per_bucket": tested_per_bucket(folds, volumes, thresholds),
    }
    return folds, record


def run_split(config: Mapping[str, Any], task: str, data: Path, out_dir: Path) -> None:
    """Write ``fold{k}.json`` per fold/trial, ``heldout.json`` and, for a bucketed task, ``size_buckets.json``."""
    data, out_dir = Path(data), Path(out_dir)
    spec = config["tasks"][task]
    split = spec["split"]
    manifest_path = data / paths.MANIFEST
    manifest = read_json(manifest_path)
    if manifest.get("purpose") != "task" or manifest.get("task") != task:
        raise InputDataError(manifest_path, f"not the preprocessed manifest of task '{task}'")
    cases = sorted({entry["case"] for entry in manifest["cases"]})
    rng = numpy_rng(config["seed"], "split", task)
    params = {"split": split, "size_buckets_mm3": spec.get("size_buckets_mm3")}
    with tracked_run(config, "split", {"task": task}, params=params) as run:
        try:
            folds, buckets = resolve_buckets(cases, spec, bucket_volumes(manifest, spec), rng)
        except (ValueError, KeyError) as err:
            raise InputDataError(manifest_path, f"cannot split task '{task}': {err}") from err
        thresholds = buckets["thresholds_mm3"] if buckets else None
        for k, fold in enumerate(folds):
            write_json(
                out_dir / f"fold{k}.json",
                {"task": task, "fold": k, "kind": split["kind"], "seed": config["seed"], **fold,
                 "size_buckets_mm3": thresholds},
            )
        heldout = sorted({case for fold in folds for case in fold["test"]})
        write_json(out_dir / "heldout.json", {"task": task, "dataset": manifest["dataset"], "cases": heldout})
        metrics = {"n_cases": len(cases), "n_folds": len(folds), "n_heldout": len(heldout)}
        if buckets:
            buckets["rule"] = bucket_rule(thresholds)
            write_json(out_dir / Path(paths.SIZE_BUCKETS).name, {"task": task, **buckets})
            run.tags({"size_bucket_rule": buckets["rule"], "size_buckets_how": buckets["how"]})
            metrics |= {
                "size_buckets_mm3/small_medium": thresholds[0], "size_buckets_mm3/medium_large": thresholds[1],
                "size_buckets/draws": buckets["draws"], "size_buckets/n_basis_cases": len(buckets["basis_cases"]),
                **{f"size_buckets/min_test_cases/{b}": min(c[b] for c in buckets["test_cases_per_bucket"])
                   for b in SIZE_BUCKETS},
            }
        run.metrics(metrics)
