"""Deterministic synthetic stand-ins for the paper's datasets (Table 1 and both tasks).

Nothing is shipped: every case is drawn from a generator seeded by the study seed,
the dataset and the case index, so the whole study runs anywhere, offline, and the
same config always gives byte-identical volumes. The phantoms are small (at most
~1.2 M voxels at 1 mm) so the full protocol fits on a laptop CPU, but keep what
the study depends on: CT in HU with air, fat, soft tissue, lung and bone; MRI in
scanner-like units with bias field and Rician noise; anisotropic voxels in a RAS
affine; and, for BraTS, tumours whose volumes spread evenly over the paper's
small/medium/large size buckets.

Geometry is built in millimetres (world coordinates, RAS+: +x patient right,
+y anterior, +z superior) and then sampled on the voxel grid, so a phantom looks
the same whatever its spacing.

This module is the public face: `generate_case` and the MSD folder writer. The kinds
are listed in `sar3d.data.phantom_specs`; their anatomies are drawn in
`sar3d.data.phantom_ct` and `sar3d.data.phantom_mri` from the geometry and noise of
`sar3d.data.phantom_shapes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sar3d.data.phantom_ct import chest_ct, liver_ct, pancreas_ct
from sar3d.data.phantom_mri import brain_mri, heart_mri
from sar3d.data.phantom_specs import SPECS
from sar3d.io import save_volume, write_json
from sar3d.seeding import numpy_rng

_GENERATORS = {
    "chest_ct": lambda rng, index: chest_ct(rng),
    "liver_ct": lambda rng, index: liver_ct(rng),
    "brain_mri": brain_mri,
    "heart_mri": lambda rng, index: heart_mri(rng),
    "pancreas_ct": lambda rng, index: pancreas_ct(rng),
}


def case_id(kind: str, index: int) -> str:
    return f"{kind}_{index:03d}"


def generate_case(
    kind: str, seed_or_rng: int | np.random.Generator, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case as ``(image, label, affine)``.

    An integer seed derives the case's own generator from (seed, kind, index), so
    cases are independent of how many are generated and in which order. CT images
    are int16 HU, MRI float32 (4D, channels last, for ``brain_mri``); labels uint8.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"unknown phantom kind '{kind}' (known: {', '.join(_GENERATORS)})")
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    else:
        rng = numpy_rng(int(seed_or_rng), "phantom", kind, index)
    image, label, affine = _GENERATORS[kind](rng, index)
    return image, label.astype(np.uint8), affine


def dataset_description(kind: str, name: str, training: list[dict[str, str]]) -> dict:
    """MSD-style dataset.json content for a phantom folder."""
    spec = SPECS[kind]
    return {
        "name": name,
        "description": f"sar3d phantom standing in for {spec.stands_in_for}",
        "reference": "synthetic (sar3d.data.phantom)",
        "licence": "CC0",
        "tensorImageSize": "4D" if len(spec.channels) > 1 else "3D",
        "modality": {str(i): c for i, c in enumerate(spec.channels)},
        "labels": {str(k): v for k, v in spec.labels.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }


def write_phantom_dataset(kind: str, n_cases: int, seed: int, out_dir: str | Path, *,
                          name: str | None = None) -> list[dict]:
    """Write ``n_cases`` cases of ``kind`` as an MSD folder (images, labels, dataset.json).

    Returns one record per case (id, relative paths, shape, spacing) for the caller's
    manifest; ``dataset.json`` gets the caller's extra blocks by rewriting it.
    """
    out_dir = Path(out_dir)
    spec = SPECS[kind]
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    records, training = [], []
    for index in range(n_cases):
        image, label, affine = generate_case(kind, seed, index)
        case = case_id(kind, index)
        image_rel, label_rel = f"imagesTr/{case}.nii.gz", f"labelsTr/{case}.nii.gz"
        save_volume(out_dir / image_rel, image, affine, dtype=np.int16 if spec.modality == "CT" else np.float32)
        save_volume(out_dir / label_rel, label, affine, dtype=np.uint8)
        training.append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
        records.append({"case": case, "image": image_rel, "label": label_rel,
                        "shape": list(image.shape), "spacing": list(spec.spacing)})
    write_json(out_dir / "dataset.json", dataset_description(kind, name or kind, training))
    return records

