"""The real volumes Debian ships, for tests that need real anatomy (``.ci/run`` installs both packages).

``CH2``: mricron's T1 head MRI template. ``CRANIUM``: InVesalius' "Cranium" example head CT,
raw int16 HU inside a gzipped tar with a plist header.
"""

from __future__ import annotations

import os
import plistlib
import tarfile
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def needs(*paths: Path) -> pytest.MarkDecorator:
    """Skip where a volume is not installed, except in CI, where the missing file then fails the test."""
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing) and not os.environ.get("CI"),
                              reason=f"not installed: {', '.join(missing)} (.ci/run installs them)")


def read_inv3(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The HU volume (x, y, z) and spacing of an InVesalius project, read in memory without extracting."""
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        header = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = header["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    zyx = np.frombuffer(raw, dtype=matrix["dtype"]).reshape(matrix["shape"])
    return np.ascontiguousarray(zyx.transpose(2, 1, 0)), tuple(float(s) for s in header["spacing"])


@lru_cache(maxsize=1)
def head_ct(step: int = 4) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The real head CT in HU (int16), every ``step``-th voxel: small enough for fast tests."""
    hu, spacing = read_inv3(CRANIUM)
    return np.ascontiguousarray(hu[::step, ::step, ::step]), tuple(s * step for s in spacing)


@lru_cache(maxsize=1)
def t1_mri(step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The real T1 head MRI (float32) and its affine, every ``step``-th voxel."""
    img = nib.load(CH2)
    data = np.asarray(img.dataobj, dtype=np.float32)[::step, ::step, ::step]
    affine = img.affine @ np.diag([step, step, step, 1.0])
    return np.ascontiguousarray(data), affine
