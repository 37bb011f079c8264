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

from sar3d.io import InputDataError, read_json, write_json
from sar3d.paths import MANIFEST
from sar3d.seeding import numpy_rng
from sar3d.tracking import tracked_run

SIZE_BUCKETS = ("small", "medium", "large")


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
    """Nested subsets of the training cases for the label-ratio study (1/2 ⊇ 1/5 ⊇ ...).

    One random order is drawn and every ratio takes its prefix, so a smaller
    subset is always contained in a larger one; each holds at least one case.
    """
    cases = sorted(set(train_cases))
    if not cases:
        raise ValueError("no training cases")
    order = _shuffled(cases, rng)
    out = {}
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise ValueError(f"label ratio {ratio} outside (0, 1]")
        out[ratio] = sorted(order[: max(1, round_half_up(ratio * len(cases)))])
    return out


def case_strata(manifest: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, str] | None:
    """Size bucket of the first evaluated class per case, or None when the task has no buckets."""
    thresholds = spec.get("size_buckets_mm3")
    if not thresholds:
        return None
    first_class = next(iter(spec["classes"]))
    strata = {}
    for entry in manifest["cases"]:
        volume = entry.get("foreground_mm3", {}).get(first_class)
        if volume is None:
            raise KeyError(f"case '{entry['case']}' has no foreground volume of class '{first_class}'")
        strata[entry["case"]] = size_bucket(volume, thresholds)
    return strata


def run_split(config: Mapping[str, Any], task: str, data: Path, out_dir: Path) -> None:
    """Write ``fold{k}.json`` for every fold/trial and ``heldout.json`` from the task's manifest."""
    data, out_dir = Path(data), Path(out_dir)
    spec = config["tasks"][task]
    split = spec["split"]
    manifest_path = data / MANIFEST
    manifest = read_json(manifest_path)
    if manifest.get("purpose") != "task" or manifest.get("task") != task:
        raise InputDataError(manifest_path, f"not the preprocessed manifest of task '{task}'")
    cases = sorted({entry["case"] for entry in manifest["cases"]})
    rng = numpy_rng(config["seed"], "split", task)
    params = {"split": split, "size_buckets_mm3": spec.get("size_buckets_mm3")}
    with tracked_run(config, "split", {"task": task}, params=params) as run:
        try:
            strata = case_strata(manifest, spec)
            if split["kind"] == "trials":
                folds = make_trials(
                    cases, split["n"], split["test_fraction"], split["val_fraction"], rng, strata,
                    fixed_test=split["fixed_test"],
                )
            else:
                folds = make_kfold(cases, split["n"], split["val_fraction"], rng)
        except (ValueError, KeyError) as err:
            raise InputDataError(manifest_path, f"cannot split task '{task}': {err}") from err
        for k, fold in enumerate(folds):
            write_json(
                out_dir / f"fold{k}.json",
                {"task": task, "fold": k, "kind": split["kind"], "seed": config["seed"], **fold},
            )
        heldout = sorted({case for fold in folds for case in fold["test"]})
        write_json(out_dir / "heldout.json", {"task": task, "dataset": manifest["dataset"], "cases": heldout})
        run.metrics({"n_cases": len(cases), "n_folds": len(folds), "n_heldout": len(heldout)})
