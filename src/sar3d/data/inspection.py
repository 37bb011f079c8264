"""``sar3d inspect PATH``: what a dataset folder holds and every problem the data stage would stop on.

Meant for before a study is configured on a folder: it recognises the layout with
the same classes the ``folder`` source converts with (``sar3d.data.layouts``), reads
every case, and keeps going past problems so that one run lists all of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sar3d.data.layouts import Layout, open_layout
from sar3d.io import InputDataError, atomic_output, voxel_spacing


@dataclass
class CaseSummary:
    """What one case holds: geometry, intensity range per channel, label values and volumes (native values)."""

    case: str
    shape: list[int]
    spacing_mm: list[float]
    intensity: list[tuple[float, float]]
    labels: list[int] = field(default_factory=list)
    label_mm3: dict[int, float] = field(default_factory=dict)
    tumour_mm3: float | None = None


@dataclass
class Report:
    """A folder's layout, its readable cases and every problem found (as ``path: problem`` strings)."""

    root: str
    layout: str | None = None
    title: str = ""
    channels: list[str] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    label_map: dict[int, int] = field(default_factory=dict)
    tumour_labels: list[int] = field(default_factory=list)
    n_listed: int = 0
    cases: list[CaseSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def summarise_case(layout: Layout, native: Any) -> CaseSummary:
    """Read one case (all the layout's checks) and describe it."""
    data = layout.read(native)
    image = data.image if data.image.ndim == 4 else data.image[..., None]
    intensity = [(float(image[..., c].min()), float(image[..., c].max())) for c in range(image.shape[3])]
    summary = CaseSummary(native.case, [int(n) for n in image.shape[:3]],
                          [round(float(s), 4) for s in voxel_spacing(data.affine)], intensity)
    if data.label is not None:
        voxel_mm3 = float(abs(np.linalg.det(data.affine[:3, :3])))
        values, counts = np.unique(data.label.astype(np.int64), return_counts=True)
        summary.labels = [int(v) for v in values]
        summary.label_mm3 = {int(v): float(n) * voxel_mm3 for v, n in zip(values, counts, strict=True) if v}
        if layout.tumour:
            summary.tumour_mm3 = sum(summary.label_mm3.get(v, 0.0) for v in layout.tumour)
    return summary


def inspect_folder(root: str | Path, layout_name: str = "auto", progress: bool = True) -> Report:
    """Recognise ``root``'s layout and read every case, collecting every problem instead of stopping.

    Args:
        root: the dataset folder.
        layout_name: ``auto`` or a layout name (as the dataset's ``layout`` key).
        progress: show a progress bar over the cases (on stderr).
    """
    report = Report(root=str(root))
    try:
        layout = open_layout(root, layout_name)
    except InputDataError as err:
        report.problems.append(str(err))
        return report
    cases, problems = layout.scan()
    report.layout, report.title, report.n_listed = layout.name, layout.title, len(cases) + len(problems)
    report.problems += [str(p) for p in problems]
    for native in tqdm(cases, desc=f"inspect {layout.name}", unit="case", disable=None if progress else True,
                       mininterval=1.0):
        try:
            report.cases.append(summarise_case(layout, native))
        except InputDataError as err:
            report.problems.append(str(err))
    report.channels = list(layout.channels)
    report.label_names = dict(layout.labels or {})
    report.label_map = dict(layout.label_map)
    report.tumour_labels = list(layout.tumour)
    return report


def _triple(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _stats(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    low, mid, high = np.min(values), np.median(values), np.max(values)
    return f"min {fmt.format(low)}, median {fmt.format(mid)}, max {fmt.format(high)}"


def format_report(report: Report) -> str:
    """The report as the lines ``sar3d inspect`` prints."""
    lines = [f"{report.root}"]
    if report.layout is None:
        lines.append("  layout       not recognised")
    else:
        cases = report.cases
        lines += [
            f"  layout       {report.layout} ({report.title})",
            f"  cases        {len(cases)} readable of {report.n_listed} found",
            f"  modalities   {', '.join(report.channels) or '-'}",
        ]
        if cases:
            shapes, spacings = np.array([c.shape for c in cases]), np.array([c.spacing_mm for c in cases])
            lines.append(f"  shape        min {_triple(shapes.min(0))}, max {_triple(shapes.max(0))}")
            lines.append(f"  spacing mm   min {_triple(spacings.min(0))}, median {_triple(np.median(spacings, 0))}, "
                         f"max {_triple(spacings.max(0))}")
            for c, name in enumerate(report.channels or ["image"]):
                low = min(case.intensity[c][0] for case in cases if c < len(case.intensity))
                high = max(case.intensity[c][1] for case in cases if c < len(case.intensity))
                lines.append(f"  intensity    {name}: [{low:g}, {high:g}] (over all cases)")
        lines += _label_lines(report)
    if report.problems:
        lines.append(f"  problems     {len(report.problems)} (the data stage would stop on each):")
        lines += [f"    - {p}" for p in report.problems]
    else:
        lines.append("  problems     none")
    return "\n".join(lines)


def _label_lines(report: Report) -> list[str]:
    labelled = [c for c in report.cases if c.labels]
    if not labelled:
        return ["  labels       none (unlabelled: pre-training only)"] if report.cases else []
    values = sorted({v for c in labelled for v in c.labels})
    names = [f"{v} {report.label_names.get(v, '?')}" for v in values]
    lines = [f"  labels       {', '.join(names)}"]
    if report.label_map:
        mapped = ", ".join(f"{k} -> {v}" for k, v in sorted(report.label_map.items()))
        lines.append(f"  study labels {mapped} (the conversion's mapping)")
    for v in values[1:] if values and values[0] == 0 else values:
        volumes = [c.label_mm3.get(v, 0.0) for c in labelled]
        lines.append(f"  label {v} mm3  {_stats(volumes)} ({sum(x > 0 for x in volumes)} cases hold it)")
    if report.tumour_labels:
        tumours = [c.tumour_mm3 for c in labelled if c.tumour_mm3 is not None]
        which = ", ".join(str(v) for v in report.tumour_labels)
        lines.append(f"  tumour mm3   {_stats(tumours)} (labels {which}; {len(tumours)} cases)")
    else:
        lines.append("  tumour mm3   - (no tumour label in this layout)")
    return lines


def write_report_json(report: Report, path: Path) -> None:
    """The full report, every case included, as JSON (written atomically)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n")
