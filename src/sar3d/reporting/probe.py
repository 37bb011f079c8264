"""The probe table: how much of each segmentation an initialisation's frozen features hold, level by level.

Rows are ``probe.inits`` in the tables' order; columns are (task, class, level)
(:data:`sar3d.evaluation.probe.LEVELS`). Each cell is, as in the other tables,
the mean ± sample std over folds of the per-fold mean Dice over test cases.
Every init is compared with ``scratch`` (the seeded random network, the floor)
per column: difference of means, Welch's (or Student's, ``report.ttest_equal_var``)
p-value and the seeded bootstrap CI of :mod:`sar3d.reporting.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sar3d import paths
from sar3d.evaluation.probe import CSV_COLUMNS, LEVELS
from sar3d.io import atomic_output
from sar3d.pretraining.registry import SCRATCH, display_name, table_order
from sar3d.reporting.markdown import DASH, format_cell, format_p
from sar3d.reporting.stats import compare_as_configured
from sar3d.seeding import derive_seed

__all__ = ["build_probe_table", "probe_files", "run_probe_report"]


def probe_ratio(config: Mapping[str, Any]) -> float:
    """The label ratio every probe trains at: the study's smallest (the few-label regime)."""
    return min(config["finetune"]["label_ratios"])


def probe_files(config: Mapping[str, Any]) -> list[Path]:
    """Every probe CSV the config expects (task x probe init x fold, at :func:`probe_ratio`)."""
    tag = paths.ratio_tag(probe_ratio(config))
    return [
        paths.fill(paths.PROBE, config["results_dir"], task=task, init=init, ratio=tag, fold=fold)
        for task, spec in config["tasks"].items()
        for init in config["probe"]["inits"]
        for fold in range(spec["split"]["n"])
    ]


def build_probe_table(config: Mapping[str, Any], frame: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per (task, class, level, init) with mean, std, folds and the comparison with scratch."""
    inits = table_order(config, list(config["probe"]["inits"]))
    per_fold = frame.groupby(["task", "class", "level", "init", "fold"])["dice"].mean() * 100
    records = []
    for task, spec in config["tasks"].items():
        for cls in spec["classes"]:
            for level in LEVELS:
                values = {
                    init: per_fold.get((task, cls, level, init), pd.Series(dtype=float)).dropna() for init in inits
                }
                for init in inits:
                    v = values[init]
                    rec = {"task": task, "class": cls, "level": level, "init": init,
                           "mean": v.mean() if len(v) else np.nan, "std": v.std(ddof=1) if len(v) > 1 else np.nan,
                           "n_folds": len(v), "fold_values": " ".join(f"{f}:{x:.4f}" for f, x in v.items())}
                    if init != SCRATCH and SCRATCH in values:
                        cmp = compare_as_configured(config, v.to_numpy(), values[SCRATCH].to_numpy(),
                                                    derive_seed(config["seed"], "probe", task, cls, level, init))
                        rec.update(mean_diff_vs_scratch=cmp.mean_diff, p_value_vs_scratch=cmp.p_value,
                                   ci_low_vs_scratch=cmp.ci_low, ci_high_vs_scratch=cmp.ci_high)
                    records.append(rec)
    return pd.DataFrame.from_records(records)


def render_probe_markdown(config: Mapping[str, Any], table: pd.DataFrame) -> str:
    ratio = probe_ratio(config)
    test = "Student's" if config["report"]["ttest_equal_var"] else "Welch's"
    lines = [f"# Linear probes: Dice (%) of a 1x1x1 classifier on frozen features (label ratio {ratio:g})", ""]
    for (task, cls), block in table.groupby(["task", "class"], sort=False):
        lines += [f"## {task}: {cls}", "", "| Init | " + " | ".join(LEVELS) + " |", "|---|" + "---:|" * len(LEVELS)]
        for init, rows in block.groupby("init", sort=False):
            cells = []
            for level in LEVELS:
                r = rows[rows["level"] == level].iloc[0]
                cell = format_cell(r["mean"], r["std"])
                if init != SCRATCH and "mean_diff_vs_scratch" in r and np.isfinite(r["mean_diff_vs_scratch"]):
                    cell += f" (Δ {r['mean_diff_vs_scratch']:+.2f}, p {format_p(r['p_value_vs_scratch'])})"
                cells.append(cell if np.isfinite(r["mean"]) else DASH)
            name = f"{display_name(config, init)} (random init: the floor)" if init == SCRATCH else \
                display_name(config, init)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Cells: mean ± sample std over folds/trials of the per-fold mean test Dice. Levels: `enc1` (full "
        "resolution) to `enc4` (the bottleneck, 1/8) of the encoder, `dec` the last decoder level. The probe "
        "trains on the fold's labelled cases at this label ratio, the network is the fine-tuning's starting "
        f"point. Δ = mean(row) − mean(random init), p = two-sided {test} t-test over folds.",
    ]
    return "\n".join(lines) + "\n"


def run_probe_report(
    config: dict[str, Any], files: Sequence[Path] | None, out_csv: Path | None = None, out_md: Path | None = None,
) -> pd.DataFrame:
    """Write the probe table (CSV and Markdown) from the probe CSVs (default: those of the grid that exist)."""
    from sar3d.tracking import tracked_run

    results = config["results_dir"]
    files = [p for p in probe_files(config) if p.exists()] if files is None else [Path(p) for p in files]
    frame = pd.concat([pd.read_csv(p) for p in files], ignore_index=True) if files else \
        pd.DataFrame(columns=CSV_COLUMNS)
    out_csv = Path(out_csv or paths.fill(paths.TABLE, results, table="probe"))
    out_md = Path(out_md or paths.fill(paths.TABLE_MD, results, table="probe"))
    table = build_probe_table(config, frame)
    with tracked_run(config, "report", {"table": "probe"}, params={"probe": config["probe"]}) as run:
        with atomic_output(out_csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        with atomic_output(out_md) as tmp:
            tmp.write_text(render_probe_markdown(config, table))
        run.metrics({f"{r['task']}/{r['class']}/{r['level']}/{r['init']}": r["mean"]
                     for _, r in table.iterrows() if np.isfinite(r["mean"])})
        run.artifact(out_csv)
        run.artifact(out_md)
    return table
