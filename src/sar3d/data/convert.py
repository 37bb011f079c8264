"""The ``folder`` source: a dataset folder you have, validated and written as the study's raw MSD folder.

The layout classes (``sar3d.data.layouts``) say where a case's files are and check them
as they read; this module decides what the raw folder holds: links where a file
can be used as it is, NIfTI written where it cannot (stacked sequences,
MetaImage, relabelled maps), and the dataset.json that describes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sar3d.config import ConfigError
from sar3d.data import layouts
from sar3d.io import check_labels, save_volume, voxel_spacing, write_json


def folder_layout(config: Mapping[str, Any], dataset: str) -> layouts.Layout:
    """The layout of a ``folder`` dataset, refused when it contradicts the config (modality, labels)."""
    spec = config["datasets"][dataset]
    layout = layouts.open_layout(spec["path"], spec.get("layout", "auto"))
    if layout.modality and layout.modality != spec["modality"]:
        raise ConfigError(f"config key 'datasets.{dataset}.modality': {spec['modality']}, but {layout.root} "
                          f"is a {layout.name} folder ({layout.modality})")
    users = [t for t, task in config.get("tasks", {}).items() if task["dataset"] == dataset]
    if users and not layout.labelled:
        raise ConfigError(f"config key 'tasks.{users[0]}.dataset': '{dataset}' is a {layout.name} folder, "
                          "which has no labels (pre-training only)")
    return layout


def case_record(root: Path, case: str, image: Path, label: Path | None, shape: Iterable[int],
                zooms: Iterable[float]) -> dict[str, Any]:
    """A raw folder's manifest entry: case id, its files relative to ``root``, shape and spacing."""
    return {
        "case": case,
        "image": image.relative_to(root).as_posix(),
        "label": label.relative_to(root).as_posix() if label is not None else None,
        "shape": [int(n) for n in shape],
        "spacing": [round(float(s), 6) for s in list(zooms)[:3]],
    }


def convert_folder(layout: layouts.Layout, out: Path, label_map: Mapping[str, int] | None,
                   allowed_after_map: set[int] | None) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Validate every case of a dataset folder fully and write it into ``out`` in MSD layout.

    A case that is already one NIfTI image is symlinked; anything else (BraTS's four
    sequences stacked channels last, LUNA16's MetaImage) is written as NIfTI. Labels are
    linked, or rewritten when the mapping changes their values. ``label_map`` (native
    value -> study value) replaces the layout's own mapping when given. Every image and
    label is read, so a missing or truncated file, NaNs, a grid mismatch or a label
    outside the set stops here with the file's name rather than deep inside training.

    Args:
        layout: the source folder's layout (``sar3d.data.layouts.open_layout``).
        out: the (empty) raw folder to fill.
        label_map: the config's ``label_map`` (string keys), or None for the layout's own.
        allowed_after_map: label values the study's tasks accept (None: no task uses it).

    Returns:
        The manifest's case records and the label mapping applied.
    """
    native_cases, problems = layout.scan()
    layouts.first_problem(problems)
    mapping = {int(k): int(v) for k, v in label_map.items()} if label_map else dict(layout.label_map)
    allowed = set(layout.study_labels(mapping)) or None
    if allowed_after_map is not None:
        allowed = allowed & allowed_after_map if allowed is not None else set(allowed_after_map)
    (out / "imagesTr").mkdir()
    if layout.labelled:
        (out / "labelsTr").mkdir()
    cases, training = [], []
    for native in tqdm(native_cases, desc=f"{layout.name} {layout.root.name}", unit="case", mininterval=5.0):
        data = layout.read(native)
        image_out = _store(native.images, out / "imagesTr" / native.case, data.image, data.affine)
        entry = {"image": f"./imagesTr/{image_out.name}"}
        label_out = None
        if native.label is not None:
            mapped = _remap(data.label, mapping)
            check_labels(native.label, mapped, allowed if allowed is not None else np.unique(mapped))
            unchanged = np.array_equal(mapped, data.label)
            label_out = _store((native.label,) if unchanged else (), out / "labelsTr" / native.case, mapped,
                               data.affine, dtype=np.uint8)
            entry["label"] = f"./labelsTr/{label_out.name}"
        spacing = voxel_spacing(data.affine)
        cases.append(case_record(out, native.case, image_out, label_out, data.image.shape, spacing))
        training.append(entry)
    description = layout.description(mapping)
    description["training"], description["numTraining"] = training, len(training)
    write_json(out / "dataset.json", description)
    return cases, mapping


def _store(sources: tuple[Path, ...], stem: Path, data: np.ndarray, affine: np.ndarray,
           dtype: type | None = None) -> Path:
    """Link ``sources`` when it is one NIfTI file holding ``data`` as is; else write ``data`` as NIfTI."""
    suffix = layouts.nifti_suffix(sources[0]) if len(sources) == 1 else None
    if suffix:
        dest = stem.with_name(stem.name + suffix)
        _link_or_copy(sources[0], dest)
        return dest
    dest = stem.with_name(stem.name + ".nii.gz")
    save_volume(dest, data, affine, dtype=dtype or _storage_dtype(data))
    return dest


def _storage_dtype(data: np.ndarray) -> type:
    """int16 for whole-number data in its range (CT in HU, most MRI), float32 otherwise."""
    if data.size and np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        return np.int16
    return np.float32


def _remap(label: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Apply a value mapping simultaneously (so {1: 2, 2: 1} swaps)."""
    out = label.copy()
    for old, new in mapping.items():
        out[label == old] = new
    return out


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        dest.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, dest)
