"""The folder layouts a dataset arrives in, each read into cases the study's raw folder can hold.

The raw folder is MSD-shaped (docs/architecture.md), but researchers have BraTS2018,
LUNA16 and LiTS as the challenges ship them. One class per layout knows where a
case's files are, how to read them (nibabel for NIfTI, SimpleITK for MetaImage) and
which label values are valid. The ``folder`` source (``sar3d.data.download``) converts and
``sar3d inspect`` reports through the same classes, so both stop on the same problems.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from sar3d.data.metaimage import load_metaimage, raw_file_problem
from sar3d.io import InputDataError, check_labels, check_same_grid, load_volume, read_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class NativeCase:
    """Where one case's files are: one image per channel (study order) or one 4D image, and a label."""

    case: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class CaseData:
    """One case read and checked: image (X, Y, Z) or (X, Y, Z, C) channels last, label in native values."""

    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None


def nifti_suffix(path: Path) -> str | None:
    """``.nii.gz`` or ``.nii`` when ``path`` is a NIfTI file name, else None."""
    return next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)


def strip_nifti(name: str) -> str:
    """``BRATS_001.nii.gz`` -> ``BRATS_001``."""
    suffix = nifti_suffix(Path(name))
    return name[: -len(suffix)] if suffix else name


def first_problem(problems: list[InputDataError]) -> None:
    """Raise the first problem, saying how many more there are and where all of them are listed."""
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): `sar3d inspect` lists them all)" if problems[1:] else ""
        raise InputDataError(first.path, first.problem + more)


class Layout:
    """One folder layout; subclasses say where files are, which labels are valid and how to map them."""

    name: ClassVar[str]
    title: ClassVar[str]
    expects: ClassVar[str]  # what a folder of this layout holds, for error messages
    modality: ClassVar[str | None] = None  # CT or MRI; None: the folder does not say
    label_map: ClassVar[dict[int, int]] = {}  # native label value -> the study's value
    labelled: ClassVar[bool] = True
    channels: tuple[str, ...] = ()
    labels: dict[int, str] | None = None  # native value -> name; None: unlabelled (or undeclared)
    tumour: tuple[int, ...] = ()  # native values that make up the tumour (inspect's volumes)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def matches(cls, root: Path) -> bool:
        raise NotImplementedError

    def scan(self) -> tuple[list[NativeCase], list[InputDataError]]:
        """Every case whose files are all there, and a problem for each that is not (reads no voxels)."""
        raise NotImplementedError

    def load(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One image file as ``(float32 data, affine)``; NIfTI unless a layout says otherwise."""
        return load_volume(path)

    def read(self, case: NativeCase) -> CaseData:
        """Read every file of a case and check grids, channel count and label values."""
        volumes, affine = [], None
        for path in case.images:
            data, this_affine = self.load(path)
            if len(case.images) > 1 and data.ndim != 3:
                raise InputDataError(path, f"expected a 3D volume, got shape {data.shape}")
            if affine is None:
                affine = this_affine
            else:
                check_same_grid(case.images[0], volumes[0].shape, affine, path, data.shape, this_affine)
            volumes.append(data)
        image = volumes[0] if len(volumes) == 1 else np.stack(volumes, axis=-1)
        if image.ndim not in (3, 4):
            raise InputDataError(case.images[0], f"image of shape {image.shape}: expected 3D, or 4D channels last")
        n_channels = image.shape[3] if image.ndim == 4 else 1
        if self.channels and n_channels != len(self.channels):
            raise InputDataError(case.images[0], f"image of shape {image.shape}: expected {len(self.channels)} "
                                                 f"channel(s) ({', '.join(self.channels)})")
        label = None
        if case.label is not None:
            label, label_affine = self.load(case.label)
            check_same_grid(case.images[0], image.shape, affine, case.label, label.shape, label_affine)
            if label.ndim != 3:
                raise InputDataError(case.label, f"expected a 3D label map, got shape {label.shape}")
            if self.labels is not None:
                check_labels(case.label, label, self.labels, what=f"the {self.name} layout's set")
        return CaseData(image, affine, label)

    def study_labels(self, mapping: Mapping[int, int]) -> dict[int, str]:
        """The label names by the values they take in the study (after ``mapping``)."""
        return {mapping.get(v, v): name for v, name in (self.labels or {}).items()}

    def description(self, mapping: Mapping[int, int]) -> dict[str, object]:
        """The raw folder's dataset.json, without its training list."""
        out: dict[str, object] = {"name": self.title, "layout": self.name,
                                  "modality": {str(i): c for i, c in enumerate(self.channels)}}
        if self.labelled:
            out["labels"] = {str(v): name for v, name in sorted(self.study_labels(mapping).items())}
        return out


def _missing(path: Path, needs: str) -> InputDataError:
    return InputDataError(path, f"missing; {needs}")


class MsdLayout(Layout):
    """Medical Segmentation Decathlon / nnU-Net v1: dataset.json, imagesTr/, labelsTr/."""

    name = "msd"
    title = "Medical Segmentation Decathlon"
    expects = "dataset.json with imagesTr/ and labelsTr/"
    TUMOUR_NAMES = re.compile(r"tumou?r|cancer|edema|oedema|lesion|nodule|metasta", re.IGNORECASE)

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.source_description: dict[str, object] = {}

    @classmethod
    def matches(cls, root: Path) -> bool:
        return (root / "dataset.json").is_file()

    def scan(self) -> tuple[list[NativeCase], list[InputDataError]]:
        try:
            pairs = training_pairs(self.root)
        except InputDataError as err:
            return [], [err]
        self.source_description = read_json(self.root / "dataset.json")
        modality = self.source_description.get("modality") or {}
        self.channels = tuple(modality[k] for k in sorted(modality, key=int))
        declared = self.source_description.get("labels") or {}
        self.labels = {int(k): v for k, v in declared.items()} or None
        self.tumour = tuple(v for v, name in (self.labels or {}).items() if self.TUMOUR_NAMES.search(name))
        cases, problems = [], []
        for case, image, label in pairs:
            missing = [p for p in (image, label) if not p.is_file()]
            problems += [InputDataError(p, "listed in dataset.json but missing") for p in missing]
            if not missing:
                cases.append(NativeCase(case, (image,), label))
        return cases, problems

    def description(self, mapping: Mapping[int, int]) -> dict[str, object]:
        out = dict(self.source_description)
        out["labels"] = {str(mapping.get(int(k), int(k))): v for k, v in (out.get("labels") or {}).items()}
        return out


def training_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(case, image, label) of every training entry of ``root/dataset.json``; refuses paths leaving root."""
    description_path = root / "dataset.json"
    if not description_path.is_file():
        raise InputDataError(description_path, "missing; an MSD folder needs dataset.json")
    description = read_json(description_path)
    entries = description.get("training") if isinstance(description, dict) else None
    if not entries:
        raise InputDataError(description_path, "lists no training cases ('training' is empty or missing)")
    pairs = []
    for entry in entries:
        try:
            image_rel, label_rel = entry["image"], entry["label"]
        except (TypeError, KeyError) as err:
            raise InputDataError(description_path, f"training entry {entry!r} lacks 'image' or 'label'") from err
        paths = []
        for rel in (image_rel, label_rel):
            normalised = posixpath.normpath(rel)
            if posixpath.isabs(normalised) or normalised.startswith(".."):
                raise InputDataError(description_path, f"training path '{rel}' points outside the folder")
            paths.append(root / normalised)
        pairs.append((strip_nifti(posixpath.basename(image_rel)), paths[0], paths[1]))
    return pairs


class Brats2018Layout(Layout):
    """BraTS 2018 training data: HGG/ and LGG/ hold one folder per case with five NIfTI files.

    Channels are stacked in MSD Task01's order (FLAIR, T1w, t1gd, T2w) so the study's
    channel indices mean the same on both sources. Labels follow Task01 too: BraTS 2
    (edema) -> 1, 1 (necrotic / non-enhancing core) -> 2, 4 (enhancing) -> 3.
    """

    name = "brats2018"
    title = "BraTS 2018"
    expects = "HGG/ and/or LGG/ case folders holding <case>_flair/_t1/_t1ce/_t2/_seg.nii.gz"
    modality = "MRI"
    GRADES = ("HGG", "LGG")
    SEQUENCES = ("flair", "t1", "t1ce", "t2")
    channels = ("FLAIR", "T1w", "t1gd", "T2w")
    labels: ClassVar[dict[int, str]] = {
        0: "background", 1: "necrotic / non-enhancing tumour core", 2: "peritumoral edema", 4: "enhancing tumour"}
    label_map: ClassVar[dict[int, int]] = {2: 1, 1: 2, 4: 3}
    tumour = (1, 2, 4)

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any((root / grade).is_dir() for grade in cls.GRADES)

    @staticmethod
    def _file(folder: Path, stem: str) -> Path:
        """``stem.nii.gz`` (as BraTS ships it), or ``stem.nii`` where only that exists."""
        gz = folder / f"{stem}.nii.gz"
        plain = folder / f"{stem}.nii"
        return plain if not gz.exists() and plain.exists() else gz

    def scan(self) -> tuple[list[NativeCase], list[InputDataError]]:
        cases, problems, seen = [], [], set()
        folders = [d for g in self.GRADES if (self.root / g).is_dir() for d in sorted((self.root / g).iterdir())
                   if d.is_dir()]
        needs = "a BraTS2018 case folder holds <case>_flair, _t1, _t1ce, _t2 and _seg .nii.gz"
        for folder in folders:
            case = folder.name
            if case in seen:
                problems.append(InputDataError(folder, f"case '{case}' is in both HGG/ and LGG/"))
                continue
            seen.add(case)
            files = [self._file(folder, f"{case}_{s}") for s in (*self.SEQUENCES, "seg")]
            missing = [p for p in files if not p.is_file()]
            problems += [_missing(p, needs) for p in missing]
            if not missing:
                cases.append(NativeCase(case, tuple(files[:-1]), files[-1]))
        if not folders:
            problems.append(InputDataError(self.root, f"no case folders; expected {self.expects}"))
        return cases, problems


class Luna16Layout(Layout):
    """LUNA16: subset0/ ... subset9/ of ``<seriesuid>.mhd`` + ``.raw`` chest CTs, unlabelled (pre-training)."""

    name = "luna16"
    title = "LUNA16"
    expects = "subset0/ ... subset9/ holding <seriesuid>.mhd + <seriesuid>.raw"
    modality = "CT"
    channels = ("CT",)
    labelled = False
    SUBSET = re.compile(r"subset(\d+)")

    @classmethod
    def _subsets(cls, root: Path) -> list[Path]:
        found = [d for d in root.iterdir() if d.is_dir() and cls.SUBSET.fullmatch(d.name)] if root.is_dir() else []
        return sorted(found, key=lambda d: int(cls.SUBSET.fullmatch(d.name).group(1)))

    @classmethod
    def matches(cls, root: Path) -> bool:
        return bool(cls._subsets(root))

    def scan(self) -> tuple[list[NativeCase], list[InputDataError]]:
        cases, problems, seen = [], [], {}
        for subset in self._subsets(self.root):
            for header in sorted(subset.glob("*.mhd")):
                case = header.name[: -len(".mhd")]
                if case in seen:
                    problems.append(InputDataError(header, f"series '{case}' is also in {seen[case]}"))
                    continue
                seen[case] = subset.name
                problem = raw_file_problem(header)
                if problem is not None:
                    problems.append(problem)
                else:
                    cases.append(NativeCase(case, (header,), None))
        if not seen:
            problems.append(InputDataError(self.root, f"no .mhd files; expected {self.expects}"))
        return cases, problems

    def load(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return load_metaimage(path)


class LitsLayout(Layout):
    """LiTS 2017 training data: ``volume-<n>.nii`` with ``segmentation-<n>.nii`` beside it.

    The files may sit in the folder itself or one level down (the challenge's
    "Training Batch 1/2" folders). Labels: 0 background, 1 liver, 2 tumour.
    """

    name = "lits"
    title = "LiTS 2017"
    expects = "volume-<n>.nii and segmentation-<n>.nii (here or in one level of subfolders)"
    modality = "CT"
    channels = ("CT",)
    labels: ClassVar[dict[int, str]] = {0: "background", 1: "liver", 2: "tumour"}
    tumour = (2,)
    FILE = re.compile(r"(volume|segmentation)-(\d+)\.nii(\.gz)?")

    @classmethod
    def _files(cls, root: Path) -> Iterable[tuple[str, int, Path]]:
        if not root.is_dir():
            return
        for path in sorted([*root.glob("*.nii*"), *root.glob("*/*.nii*")]):
            match = cls.FILE.fullmatch(path.name)
            if match:
                yield match.group(1), int(match.group(2)), path

    @classmethod
    def matches(cls, root: Path) -> bool:
        return any(kind == "volume" for kind, _, _ in cls._files(root))

    def scan(self) -> tuple[list[NativeCase], list[InputDataError]]:
        found: dict[str, dict[int, list[Path]]] = {"volume": {}, "segmentation": {}}
        for kind, number, path in self._files(self.root):
            found[kind].setdefault(number, []).append(path)
        cases, problems = [], []
        needs = "a LiTS case is volume-<n>.nii with segmentation-<n>.nii in the same folder"
        for number in sorted(set(found["volume"]) | set(found["segmentation"])):
            volumes, segmentations = found["volume"].get(number, []), found["segmentation"].get(number, [])
            if len(volumes) > 1 or len(segmentations) > 1:
                problems.append(InputDataError((volumes or segmentations)[1], f"case {number} appears twice"))
            elif not volumes:
                problems.append(_missing(segmentations[0].with_name(f"volume-{number}.nii"), needs))
            elif not segmentations or segmentations[0].parent != volumes[0].parent:
                problems.append(_missing(volumes[0].with_name(f"segmentation-{number}.nii"), needs))
            else:
                cases.append(NativeCase(f"lits_{number:03d}", (volumes[0],), segmentations[0]))
        if not found["volume"]:
            problems.append(InputDataError(self.root, f"no volume-<n>.nii files; expected {self.expects}"))
        return cases, problems


LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (MsdLayout, Brats2018Layout, Luna16Layout, LitsLayout)}


def open_layout(root: str | Path, name: str = "auto") -> Layout:
    """The layout of the folder ``root``: recognised (``auto``) or as named, refused when it does not fit.

    Args:
        root: the dataset folder.
        name: ``auto`` or one of :data:`LAYOUTS`.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputDataError(root, "dataset folder does not exist")
    if name != "auto":
        cls = LAYOUTS[name]
        if not cls.matches(root):
            raise InputDataError(root, f"not a {name} folder: expected {cls.expects}")
        return cls(root)
    found = [cls for cls in LAYOUTS.values() if cls.matches(root)]
    if not found:
        known = "; ".join(f"{cls.name}: {cls.expects}" for cls in LAYOUTS.values())
        raise InputDataError(root, f"no supported layout recognised ({known})")
    if len(found) > 1:
        names = ", ".join(cls.name for cls in found)
        raise InputDataError(root, f"fits several layouts ({names}); name one with the dataset's `layout` key")
    return found[0](root)
