"""MetaImage (``.mhd`` + ``.raw``, as LUNA16 ships its CTs) read with SimpleITK into NIfTI terms.

SimpleITK reads the voxels and the geometry (spacing, origin, direction, in ITK's
LPS world); this module turns them into the ``(x, y, z)`` array and RAS affine the
rest of the study uses (nibabel's convention), and checks the ``.raw`` file against
its header first: SimpleITK's own message for a missing or short ``.raw`` names the
``.mhd`` and says "No such file or directory" in both cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sar3d.io import InputDataError

# Bytes per voxel component of each MetaImage ElementType.
MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def read_header(path: Path) -> dict[str, str]:
    """The ``Key = Value`` fields of a ``.mhd`` header (ElementDataFile is the last one)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as err:
        raise InputDataError(path, f"not a readable MetaImage header ({err})") from err
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return fields


def raw_file_problem(header_path: Path) -> InputDataError | None:
    """What is wrong with a ``.mhd`` header or its data file (missing, shorter than the header says); None if fine.

    Args:
        header_path: the ``.mhd`` file.
    """
    try:
        fields = read_header(header_path)
    except InputDataError as err:
        return err
    data_name = fields.get("ElementDataFile")
    if not data_name:
        return InputDataError(header_path, "MetaImage header without ElementDataFile")
    if data_name == "LOCAL" or fields.get("CompressedData", "False").lower() == "true":
        return None  # data inside the header file, or compressed: only SimpleITK can tell
    raw = header_path.parent / data_name
    if not raw.is_file():
        return InputDataError(raw, f"missing; {header_path.name} names it as its ElementDataFile")
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        per_voxel = MET_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
        header_bytes = max(int(fields.get("HeaderSize", "0")), 0)
    except (KeyError, ValueError) as err:
        return InputDataError(header_path, f"MetaImage header lacks or garbles DimSize/ElementType ({err})")
    expected = int(np.prod(dims)) * per_voxel + header_bytes
    actual = raw.stat().st_size
    if actual < expected:
        return InputDataError(raw, f"{actual} bytes, but {header_path.name} needs {expected} "
                                   f"(DimSize {fields['DimSize']}, {fields['ElementType']}): truncated")
    return None


def itk_affine(spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image (ITK's geometry is LPS)."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def load_metaimage(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D MetaImage as ``(float32 data indexed x, y, z, RAS affine)``, with the checks of load_volume.

    Args:
        path: the ``.mhd`` header.
    """
    import SimpleITK as sitk  # noqa: N813 - the library's own spelling

    problem = raw_file_problem(path)
    if problem is not None:
        raise problem
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise InputDataError(path, f"not a readable MetaImage ({reason})") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputDataError(path, f"expected a 3D single-channel image, got {image.GetDimension()}D with "
                                   f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # (z, y, x) -> (x, y, z)
    if not np.isfinite(data).all():
        raise InputDataError(path, f"contains {int((~np.isfinite(data)).sum())} NaN or infinite voxel(s)")
    return np.ascontiguousarray(data), itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
