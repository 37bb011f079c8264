"""Data stage sources `msd` (served by a local HTTP server) and `folder`: integrity and safety."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from sar3d.config import validate_config
from sar3d.data.download import DownloadError, extract_msd, run_download
from sar3d.data.phantom import generate_case
from sar3d.io import InputDataError, save_volume

TASK = "Task02_Heart"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store shared with the other data-stage tests: creating a store costs seconds."""
    return tmp_path_factory.getbasetemp() / "sar3d-data-results"


def study(results: Path, **dataset: Any) -> dict[str, Any]:
    return validate_config({
        "results_dir": str(results),
        "tracking": {"experiment": "sar3d-tests-data"},
        "datasets": {"heart": {"modality": "MRI", **dataset}},
        "tasks": {"atrium": {"dataset": "heart", "normalisation": "zscore_nonzero", "labels": [0, 1],
                             "classes": {"atrium": [1]}, "split": {"kind": "kfold", "n": 2}}},
    })


# --------------------------------------------------------------------------- a tiny MSD archive


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1, mtime=0)


def add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def msd_archive(extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """An MSD-like task: two phantom heart cases, a test image, macOS ``._`` junk."""
    buffer = io.BytesIO()
    training = []
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(2):
            image, label, affine = generate_case("heart_mri", 7, index)
            add_file(tar, f"{TASK}/imagesTr/la_{index:03d}.nii.gz", nifti_gz_bytes(image, affine))
            add_file(tar, f"{TASK}/labelsTr/la_{index:03d}.nii.gz", nifti_gz_bytes(label, affine))
            add_file(tar, f"{TASK}/imagesTr/._la_{index:03d}.nii.gz", b"\x00\x05\x16\x07 apple double")
            training.append({"image": f"./imagesTr/la_{index:03d}.nii.gz",
                             "label": f"./labelsTr/la_{index:03d}.nii.gz"})
        add_file(tar, f"{TASK}/imagesTs/la_100.nii.gz", nifti_gz_bytes(image, affine))
        description = {"name": "LeftAtrium", "modality": {"0": "MRI"},
                       "labels": {"0": "background", "1": "left atrium"},
                       "numTraining": 2, "training": training}
        add_file(tar, f"{TASK}/dataset.json", json.dumps(description).encode())
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_archive() -> bytes:
    return msd_archive()


# --------------------------------------------------------------------------- a local HTTP server


@dataclass
class Served:
    """What the test server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    range_headers: list[str | None] = field(default_factory=list)
    truncate_first: bool = False
    url: str = ""


class RangeHandler(BaseHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        payload = self.served.files.get(self.path)
        requested = self.headers.get("Range")
        self.served.range_headers.append(requested)
        if payload is None:
            self.send_error(404)
            return
        start = int(requested.removeprefix("bytes=").split("-")[0]) if requested else 0
        if start >= len(payload):
            self.send_error(416)
            return
        body = payload[start:]
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.served.truncate_first and len(self.served.range_headers) == 1:
            self.wfile.write(body[: len(body) // 3])  # the connection drops part-way
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server() -> Iterator[Served]:
    served = Served()
    handler = type("Handler", (RangeHandler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def serve(server: Served, payload: bytes) -> str:
    server.files[f"/{TASK}.tar"] = payload
    return f"{server.url}/{TASK}.tar"


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


# --------------------------------------------------------------------------- msd


def test_msd_download_builds_complete_folder(tmp_path: Path, results: Path, server: Served,
                                             good_archive: bytes) -> None:
    url = serve(server, good_archive)
    out = tmp_path / "raw" / "heart"
    run_download(study(results, source="msd", task=TASK, url=url, md5=md5(good_archive)), "heart", out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "manifest.json"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["la_000.nii.gz", "la_001.nii.gz"]
    description = json.loads((out / "dataset.json").read_text())
    assert description["sar3d"]["source"] == "msd" and description["sar3d"]["md5"] == md5(good_archive)
    assert description["sar3d"]["spacing_mm"]["median"] == [1.25, 1.25, 2.5]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_cases"] == 2 and [c["case"] for c in manifest["cases"]] == ["la_000", "la_001"]
    cached = tmp_path / "raw" / "heart.download" / f"{TASK}.tar"
    assert cached.read_bytes() == good_archive
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["heart", "heart.download"]
    assert server.range_headers == [None]


def test_msd_bad_checksum_leaves_nothing(tmp_path: Path, results: Path, server: Served,
                                         good_archive: bytes) -> None:
    url = serve(server, good_archive)
    out = tmp_path / "raw" / "heart"
    wrong = "0" * 32
    with pytest.raises(DownloadError) as caught:
        run_download(study(results, source="msd", task=TASK, url=url, md5=wrong), "heart", out)
    message = str(caught.value)
    assert url in message and wrong in message and md5(good_archive) in message
    assert not out.exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], f"left behind: {leftovers}"


def test_msd_interrupted_download_resumes_with_range(tmp_path: Path, results: Path, server: Served,
                                                     good_archive: bytes) -> None:
    url = serve(server, good_archive)
    server.truncate_first = True
    out = tmp_path / "raw" / "heart"
    run_download(study(results, source="msd", task=TASK, url=url, md5=md5(good_archive)), "heart", out)
    assert (out / "manifest.json").exists()
    dropped_at = (len(good_archive)) // 3
    assert server.range_headers == [None, f"bytes={dropped_at}-"]


def test_msd_part_file_from_earlier_run_is_resumed(tmp_path: Path, results: Path, server: Served,
                                                   good_archive: bytes) -> None:
    url = serve(server, good_archive)
    cache = tmp_path / "raw" / "heart.download"
    cache.mkdir(parents=True)
    (cache / f"{TASK}.tar.part").write_bytes(good_archive[:5000])
    out = tmp_path / "raw" / "heart"
    run_download(study(results, source="msd", task=TASK, url=url, md5=md5(good_archive)), "heart", out)
    assert server.range_headers == ["bytes=5000-"]
    assert (cache / f"{TASK}.tar").read_bytes() == good_archive
    assert not (cache / f"{TASK}.tar.part").exists()


def test_msd_member_escaping_with_dotdot_is_refused(tmp_path: Path, results: Path, server: Served) -> None:
    evil = tarfile.TarInfo(f"{TASK}/../../escaped.txt")
    evil.size = 3
    payload = msd_archive([evil])
    url = serve(server, payload)
    out = tmp_path / "deep" / "raw" / "heart"
    with pytest.raises(InputDataError, match=r"escaped\.txt"):
        run_download(study(results, source="msd", task=TASK, url=url, md5=md5(payload)), "heart", out)
    assert not out.exists()
    assert list(tmp_path.rglob("escaped.txt")) == []
    assert list(tmp_path.rglob("*.nii.gz")) == []


def unsafe_member(kind: str) -> tarfile.TarInfo:
    if kind == "absolute":
        info = tarfile.TarInfo("/tmp/sar3d-absolute-member.txt")
        info.size = 3
    elif kind == "symlink":
        info = tarfile.TarInfo(f"{TASK}/imagesTr/link.nii.gz")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../outside.nii.gz"
    elif kind == "hardlink":
        info = tarfile.TarInfo(f"{TASK}/imagesTr/hard.nii.gz")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    else:
        info = tarfile.TarInfo(f"{TASK}/imagesTr/device")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("kind", ["absolute", "symlink", "hardlink", "device"])
def test_unsafe_members_are_refused_before_writing(tmp_path: Path, kind: str) -> None:
    member = unsafe_member(kind)
    archive = tmp_path / "task.tar"
    archive.write_bytes(msd_archive([member]))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(InputDataError, match="refusing unsafe archive member") as caught:
        extract_msd(archive, target)
    assert member.name in str(caught.value)
    assert list(target.iterdir()) == []
    assert not Path("/tmp/sar3d-absolute-member.txt").exists()


# --------------------------------------------------------------------------- folder


def write_folder(root: Path, labels: list[np.ndarray], *, declared: dict[str, str] | None = None,
                 label_shape_of: dict[int, tuple[int, int, int]] | None = None) -> Path:
    """A small MSD-style folder; ``label_shape_of`` gives some labels a different grid."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    training = []
    for index, label in enumerate(labels):
        image = np.random.default_rng(index).normal(100.0, 10.0, label.shape).astype(np.float32)
        save_volume(root / "imagesTr" / f"c{index}.nii.gz", image, affine)
        x, y, z = (label_shape_of or {}).get(index, label.shape)
        save_volume(root / "labelsTr" / f"c{index}.nii.gz", label[:x, :y, :z], affine, dtype=np.uint8)
        training.append({"image": f"./imagesTr/c{index}.nii.gz", "label": f"./labelsTr/c{index}.nii.gz"})
    description = {"name": "Folder", "modality": {"0": "MRI"},
                   "labels": declared or {"0": "background", "1": "atrium"},
                   "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def blob_label(value: int = 1) -> np.ndarray:
    label = np.zeros((10, 9, 6), dtype=np.uint8)
    label[3:6, 2:5, 1:4] = value
    return label


def test_folder_source_links_valid_folder(tmp_path: Path, results: Path) -> None:
    source = write_folder(tmp_path / "src", [blob_label(), blob_label()])
    out = tmp_path / "raw" / "heart"
    run_download(study(results, source="folder", path=str(source)), "heart", out)
    linked = out / "imagesTr" / "c0.nii.gz"
    assert linked.is_symlink() and linked.resolve() == (source / "imagesTr" / "c0.nii.gz").resolve()
    description = json.loads((out / "dataset.json").read_text())
    assert description["sar3d"]["source"] == "folder"
    assert description["sar3d"]["spacing_mm"]["median"] == [1.0, 1.0, 2.0]
    assert json.loads((out / "manifest.json").read_text())["n_cases"] == 2


def test_folder_label_map_remaps_values(tmp_path: Path, results: Path) -> None:
    declared = {"0": "background", "1": "edema", "4": "enhancing"}
    label = blob_label(4)
    label[0, 0, 0] = 1
    source = write_folder(tmp_path / "src", [label], declared=declared)
    config = study(results, source="folder", path=str(source), label_map={"4": 3})
    config["tasks"]["atrium"]["labels"] = [0, 1, 2, 3]
    out = tmp_path / "raw" / "heart"
    run_download(config, "heart", out)
    written = np.asarray(nib.load(out / "labelsTr" / "c0.nii.gz").dataobj)
    assert set(np.unique(written)) == {0, 1, 3}
    assert json.loads((out / "dataset.json").read_text())["labels"] == {
        "0": "background", "1": "edema", "3": "enhancing"}


def test_folder_label_outside_set_names_the_file(tmp_path: Path, results: Path) -> None:
    source = write_folder(tmp_path / "src", [blob_label(), blob_label(5)])
    out = tmp_path / "raw" / "heart"
    with pytest.raises(InputDataError, match=r"\[5\]") as caught:
        run_download(study(results, source="folder", path=str(source)), "heart", out)
    assert caught.value.path == source / "labelsTr" / "c1.nii.gz"
    assert not out.exists()


def test_folder_grid_mismatch_names_the_file(tmp_path: Path, results: Path) -> None:
    source = write_folder(tmp_path / "src", [blob_label(), blob_label()], label_shape_of={1: (10, 9, 5)})
    out = tmp_path / "raw" / "heart"
    with pytest.raises(InputDataError, match="does not match") as caught:
        run_download(study(results, source="folder", path=str(source)), "heart", out)
    assert caught.value.path == source / "labelsTr" / "c1.nii.gz"
    assert not out.exists()
