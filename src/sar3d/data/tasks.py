"""A task's preprocessed cases: the manifest, one case as image and class channels, a fold's cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sar3d.io import InputDataError, check_same_grid, load_volume, read_json, voxel_spacing
from sar3d.paths import MANIFEST


def class_channels(label: np.ndarray, classes: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Multi-label target: one binary channel per evaluated class, in the config's class order."""
    return np.stack([np.isin(label, list(values)) for values in classes.values()]).astype(np.float32)


def read_manifest(data: Path) -> dict[str, dict[str, Any]]:
    """The task manifest's cases by id."""
    manifest = read_json(Path(data) / MANIFEST)
    return {entry["case"]: entry for entry in manifest["cases"]}


def load_case(data: Path, entry: Mapping[str, Any], classes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Image ``(1, X, Y, Z)`` and class channels ``(C, X, Y, Z)`` of one preprocessed case."""
    data = Path(data)
    image, affine = load_volume(data / entry["image"])
    if entry.get("label") is None:
        raise InputDataError(data / MANIFEST, f"case '{entry['case']}' has no label")
    label, label_affine = load_volume(data / entry["label"])
    check_same_grid(data / entry["image"], image.shape, affine, data / entry["label"], label.shape, label_affine)
    return {
        "case": entry["case"],
        "image": image[None],
        "label": class_channels(np.rint(label), classes),
        "spacing": voxel_spacing(affine),
        "affine": affine,
    }


def fold_cases(split: Path, manifest: Mapping[str, Any], part: str) -> list[str]:
    """The ``part`` (train | val | test) cases of a split file, checked against the manifest."""
    cases = list(read_json(split)[part])
    missing = [c for c in cases if c not in manifest]
    if missing:
        raise InputDataError(split, f"{part} cases {missing} are not in the task manifest")
    return cases
