"""Data stage: one dataset of the study into an MSD-layout folder under ``raw/``.

Three sources share one output contract (docs/architecture.md): ``phantom``
generates a seeded stand-in, ``msd`` fetches a Medical Segmentation Decathlon task
from the public mirror MONAI uses (resumable, md5-checked, safely extracted), and
``folder`` validates an existing folder and converts it: an MSD / nnU-Net v1 folder
is linked, the native layouts of BraTS2018, LUNA16 and LiTS (``sar3d.data.layouts``) are
converted into the same MSD layout. The folder is built under a temporary name and
appears only when complete, ``manifest.json`` written last.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from sar3d.config import ConfigError
from sar3d.data import phantom
from sar3d.data.convert import case_record, convert_folder, folder_layout
from sar3d.data.layouts import training_pairs
from sar3d.io import (
    InputDataError,
    atomic_output,
    check_same_grid,
    read_json,
    write_json,
)
from sar3d.paths import MANIFEST
from sar3d.seeding import derive_seed

log = logging.getLogger(__name__)

# The public mirror of MONAI's DecathlonDataset, and the md5 of each archive.
MSD_BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
MSD_MD5 = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
}
CHUNK_BYTES = 1 << 20
DOWNLOAD_ATTEMPTS = 4
MSD_PARTS = ("imagesTr", "labelsTr", "dataset.json")


class DownloadError(InputDataError):
    """A download that failed or does not match its checksum; names the URL."""


# --------------------------------------------------------------------------- entry point


def run_download(config: Mapping[str, Any], dataset: str, out: Path) -> None:
    """Produce ``out`` as a complete MSD-layout folder for ``dataset``."""
    from sar3d.tracking import tracked_run  # mlflow is slow to import; only the stage needs it

    out = Path(out)
    if dataset not in config["datasets"]:
        raise ConfigError(f"config key 'datasets': no dataset '{dataset}' (known: {', '.join(config['datasets'])})")
    spec = config["datasets"][dataset]
    params = {**spec, "seed": config["seed"]}
    with tracked_run(config, "download", {"dataset": dataset}, params=params) as run:
        source = spec["source"]
        if source == "msd":
            archive = fetch_msd_archive(spec, cache_dir=out.with_name(out.name + ".download"))
        with atomic_output(out, directory=True) as tmp:
            if source == "phantom":
                seed = derive_seed(config["seed"], "dataset", dataset)
                cases = phantom.write_phantom_dataset(spec["phantom"], spec["n_cases"], seed, tmp, name=dataset)
                extra = {"phantom": spec["phantom"], "stands_in_for": phantom.SPECS[spec["phantom"]].stands_in_for,
                         "seed": seed}
            elif source == "msd":
                extract_msd(archive, tmp)
                extra = {"task": spec["task"], "url": msd_url(spec), "md5": msd_md5(spec)}
                cases = describe_cases(tmp)
            elif source == "folder":
                layout = folder_layout(config, dataset)
                cases, mapping = convert_folder(layout, tmp, spec.get("label_map"), task_labels(config, dataset))
                extra = {"path": str(layout.root), "layout": layout.name,
                         "label_map": {str(k): v for k, v in mapping.items()}}
            else:  # pragma: no cover - the schema restricts the choices
                raise ValueError(f"unknown source {source}")
            summary = finish_folder(tmp, dataset, spec["source"], spec["modality"], cases, extra)
        run.metrics({"n_cases": summary["n_cases"], "bytes": summary["bytes"]})
    log.info("%s: %d cases, %.1f MB in %s", dataset, summary["n_cases"], summary["bytes"] / 1e6, out)


def task_labels(config: Mapping[str, Any], dataset: str) -> set[int] | None:
    """Label values the tasks built on ``dataset`` accept (None when no task uses it)."""
    values = [set(t["labels"]) for t in config.get("tasks", {}).values() if t["dataset"] == dataset]
    return set().union(*values) if values else None


# --------------------------------------------------------------------------- describing a folder


def describe_cases(root: Path) -> list[dict[str, Any]]:
    """Header-level check and description of every training case (cheap: no voxel data read)."""
    cases = []
    for case, image_path, label_path in training_pairs(root):
        headers = []
        for path in (image_path, label_path):
            if not path.is_file():
                raise InputDataError(path, "listed in dataset.json but missing")
            try:
                headers.append(nib.load(str(path)))
            except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
                raise InputDataError(path, f"not a readable NIfTI ({err})") from err
        image, label = headers
        check_same_grid(image_path, image.shape, image.affine, label_path, label.shape, label.affine)
        cases.append(case_record(root, case, image_path, label_path, image.shape, image.header.get_zooms()))
    return cases


def finish_folder(root: Path, dataset: str, source: str, modality: str, cases: list[dict[str, Any]],
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """Add the ``sar3d`` block to dataset.json, then write the manifest (last: it marks completion)."""
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    spacing_stats = {
        stat: [round(float(v), 4) for v in fn(spacings, axis=0)]
        for stat, fn in (("min", np.min), ("median", np.median), ("max", np.max))
    }
    n_bytes = sum((root / c[key]).stat().st_size for c in cases for key in ("image", "label") if c[key])
    description = read_json(root / "dataset.json")
    description["sar3d"] = {"source": source, "modality": modality, "n_cases": len(cases),
                            "spacing_mm": spacing_stats, **extra}
    write_json(root / "dataset.json", description)
    summary = {"dataset": dataset, "source": source, "modality": modality, "n_cases": len(cases),
               "bytes": n_bytes, "spacing_mm": spacing_stats, "cases": cases}
    write_json(root / MANIFEST, summary)
    return summary


# --------------------------------------------------------------------------- msd: fetch


def msd_url(spec: Mapping[str, Any]) -> str:
    return spec.get("url") or f"{MSD_BASE_URL}/{spec['task']}.tar"


def msd_md5(spec: Mapping[str, Any]) -> str:
    return (spec.get("md5") or MSD_MD5[spec["task"]]).lower()


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fetch_msd_archive(spec: Mapping[str, Any], cache_dir: Path) -> Path:
    """The task's archive in ``cache_dir``, downloaded (or resumed) and md5-verified."""
    return download(msd_url(spec), cache_dir / f"{spec['task']}.tar", msd_md5(spec))


def download(url: str, dest: Path, expected_md5: str, attempts: int = DOWNLOAD_ATTEMPTS) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming with HTTP Range after interruptions.

    Only a file whose md5 matches is renamed to ``dest``; a mismatch deletes the part
    file (it cannot be trusted to resume from) and raises :class:`DownloadError`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if file_md5(dest) == expected_md5:
            return dest
        log.warning("%s: cached archive fails its md5 check; downloading again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(url, part)
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500:
                raise DownloadError(url, f"HTTP {err.code} {err.reason}") from err
            have = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise DownloadError(url, f"download failed after {attempts} attempts ({err}); "
                                         f"{have} bytes kept in {part} for the next run to resume") from err
            log.warning("%s: attempt %d interrupted at %d bytes (%s); resuming", url, attempt, have, err)
            time.sleep(min(2.0**attempt * 0.1, 10.0))
    actual = file_md5(part)
    if actual != expected_md5:
        part.unlink()
        raise DownloadError(url, f"md5 mismatch: expected {expected_md5}, got {actual}; "
                                 f"deleted the download {part}")
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path) -> None:
    """One request: append to ``part`` from its current size (Range), or start over if refused."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # range not satisfiable: the part file is already complete
            return
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            log.warning("%s: server ignored the Range request; starting over", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name, mininterval=5.0
        ) as bar:
            while block := response.read(CHUNK_BYTES):
                fh.write(block)
                received += len(block)
                bar.update(len(block))
    # http.client returns a short body silently when the connection drops; make it an error to resume from
    if length is not None and received < int(length):
        raise http.client.IncompleteRead(b"", int(length) - received)


# --------------------------------------------------------------------------- msd: extract


def _is_macos_junk(name: str) -> bool:
    parts = name.split("/")
    return posixpath.basename(name).startswith("._") or "__MACOSX" in parts


def _check_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    """Refuse a member that would write or point outside ``target``, or is not a file/folder/link."""
    name = member.name
    problem = None
    if posixpath.isabs(name) or os.path.isabs(name) or (os.path.splitdrive(name)[0]):
        problem = "absolute path"
    elif not (target / name).resolve().is_relative_to(target):
        problem = "path leaves the extraction folder"
    elif member.issym() or member.islnk():
        link = member.linkname
        base = target / posixpath.dirname(name) if member.issym() else target
        if posixpath.isabs(link) or not (base / link).resolve().is_relative_to(target):
            problem = f"link to '{link}' points outside the extraction folder"
    elif not (member.isfile() or member.isdir()):
        problem = "device, FIFO or other special file"
    if problem:
        raise InputDataError(archive, f"refusing unsafe archive member '{name}': {problem}")


def extract_msd(archive: Path, out: Path) -> None:
    """Extract an MSD task archive's imagesTr, labelsTr and dataset.json into ``out``.

    Every member is checked before anything is written; macOS ``._*`` files and the
    test images are skipped; the archive's top ``TaskXX_Name/`` folder is removed.
    """
    staging = out / ".extract"
    staging.mkdir()
    target = staging.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, target, archive)
            wanted = [m for m in members if not _is_macos_junk(m.name)]
            descriptions = sorted((m for m in wanted if posixpath.basename(m.name) == "dataset.json"
                                   and m.isfile()), key=lambda m: m.name.count("/"))
            if not descriptions:
                raise InputDataError(archive, "holds no dataset.json; not an MSD task archive")
            top = posixpath.dirname(posixpath.normpath(descriptions[0].name))
            keep = {posixpath.normpath(posixpath.join(top, part)) for part in MSD_PARTS}
            selected = [m for m in wanted if _under_any(posixpath.normpath(m.name), keep)]
            for member in tqdm(selected, desc=f"extract {archive.name}", unit="file", mininterval=5.0):
                _extract_one(tar, member, staging, archive)
        for part in MSD_PARTS:
            source = staging / top / part
            if not source.exists():
                raise InputDataError(archive, f"has no {posixpath.join(top, part)}")
            os.replace(source, out / part)
    except tarfile.TarError as err:
        raise InputDataError(archive, f"not a readable tar archive ({err})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _under_any(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + "/") for root in roots)


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, archive: Path) -> None:
    """Extract with tarfile's 'data' filter where this Python has it (our own check ran before)."""
    try:
        if hasattr(tarfile, "data_filter"):
            tar.extract(member, staging, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extract(member, staging)
    except getattr(tarfile, "FilterError", ()) as err:
        raise InputDataError(archive, f"refusing unsafe archive member '{member.name}': {err}") from err
