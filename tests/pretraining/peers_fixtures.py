"""Helpers shared by the VectorPOSE and SepaReg tests (not a conftest: tests/pretraining's belongs to the seam)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar3d.config import load_config
from sar3d.data.normalise import minmax_to_unit
from sar3d.data.phantom import generate_case

SEED = 20210806
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: OpenMP threads spinning on a shared 2-core machine made a 7 s test take 4 min."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def phantom_volume(kind: str, index: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A phantom case's first channel in [0, 1] as a pre-training volume is normalised, and its spacing (mm)."""
    image, _, affine = generate_case(kind, SEED, index)
    if image.ndim == 4:
        image = image[..., 0]
    image = image.astype(np.float32)
    low, high = (-1000.0, 1000.0) if kind.endswith("_ct") else (0.0, float(np.percentile(image, 99.5)))
    spacing = tuple(float(v) for v in np.abs(np.diag(affine))[:3])
    return minmax_to_unit(image, low, high, [0.0, 99.5]), spacing  # type: ignore[return-value]


def method_config(name: str, block: dict[str, Any]) -> dict[str, Any]:
    """The default study's validated config with the block ``name`` set to ``block``."""
    return load_config(REPO / "config.yaml", {"pretrain": {"methods": {name: block}}})


def volume_batch(kinds: Sequence[str]) -> dict[str, Any]:
    """A raw volume batch as the seam's VolumeStore gives it, from phantom cases."""
    volumes = [torch.from_numpy(phantom_volume(kind)[0])[None] for kind in kinds]
    return {"volumes": volumes, "modality": torch.zeros(len(kinds), dtype=torch.int64), "case": list(kinds)}
