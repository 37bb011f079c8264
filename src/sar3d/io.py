"""Safe reading and atomic writing of everything a stage produces or consumes.

Every stage writes through :func:`atomic_output` so a job killed half-way never
leaves a file or folder that Snakemake (or a person) could take as finished, and
reads volumes through :func:`load_volume` so bad input fails with the file name
and the problem instead of a stack trace deep inside a training loop.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


class InputDataError(ValueError):
    """Raised for bad input data; the message always starts with the offending path."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only on success.

    The temporary name starts with ``.`` and ends with ``.partial`` so that it is
    obviously unfinished; on any exception it is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        # keep the extension so libraries that dispatch on suffix (nibabel, numpy) behave
        suffix = "".join(target.suffixes)
        if suffix:
            renamed = tmp.with_name(tmp.name + suffix)
            tmp.rename(renamed)
            tmp = renamed
    try:
        yield tmp
        _apply_umask(tmp)
        if directory and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _apply_umask(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only entries; give outputs the permissions of a normal write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, pretty-printed so it diffs well."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON, naming the file on a parse error."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputDataError(path, f"not valid JSON ({err})") from err


def load_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume fully into memory as ``(data float32, affine)``.

    Truncated or corrupt files, and non-finite voxels, raise :class:`InputDataError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError(path, "file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as err:
        raise InputDataError(path, f"corrupt or truncated NIfTI ({type(err).__name__}: {err})") from err
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputDataError(path, f"contains {bad} NaN or infinite voxel(s)")
    return data, np.asarray(img.affine, dtype=np.float64)


def check_same_grid(
    image_path: str | os.PathLike[str],
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
    label_path: str | os.PathLike[str],
    label_shape: tuple[int, ...],
    label_affine: np.ndarray,
    atol: float = 1e-3,
) -> None:
    """Refuse an image/label pair that does not share one voxel grid."""
    if tuple(image_shape[:3]) != tuple(label_shape[:3]):
        raise InputDataError(
            label_path,
            f"label grid {tuple(label_shape[:3])} does not match image {image_path} grid {tuple(image_shape[:3])}",
        )
    if not np.allclose(image_affine, label_affine, atol=atol):
        raise InputDataError(label_path, f"label affine differs from image {image_path} affine")


def check_labels(
    path: str | os.PathLike[str], label: np.ndarray, allowed: Iterable[int], what: str = "the task's set"
) -> None:
    """Refuse label values outside ``allowed`` (``what`` names that set in the error), and non-integer labels."""
    allowed_set = {int(v) for v in allowed}
    values = np.unique(label)
    if not np.array_equal(values, np.round(values)):
        raise InputDataError(path, "label map holds non-integer values")
    unexpected = sorted(int(v) for v in values if int(v) not in allowed_set)
    if unexpected:
        raise InputDataError(path, f"label values {unexpected} outside {what} {sorted(allowed_set)}")


def save_volume(
    path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray, dtype: type | str = np.float32
) -> None:
    """Save a NIfTI volume atomically with an affine-consistent header."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the three array axes of an affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
