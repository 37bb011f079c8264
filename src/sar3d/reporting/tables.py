"""What each table is: its rows (inits), its columns (task, classes, size bucket, label ratio) and its metric."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sar3d.grid import bucketed_tasks, table2_inits, table3_inits, table4_inits
from sar3d.reporting.labels import class_title, ratio_label

BUCKETS = (("small", "S"), ("medium", "M"), ("large", "L"))
DASH = "—"


@dataclass(frozen=True)
class Metric:
    """A CSV column and how tables show it."""

    column: str
    name: str
    unit: str
    scale: float
    higher_is_better: bool


DICE = Metric("dice", "Dice", "%", 100.0, True)
HD95 = Metric("hd95_mm", "HD95", "mm", 1.0, False)


@dataclass(frozen=True)
class Column:
    """One table column: the mean over ``classes`` of per-fold means (cases of ``bucket`` only)."""

    task: str
    label: str
    classes: tuple[str, ...]
    bucket: str | None
    ratio: float


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    inits: list[str]
    columns: list[Column]
    metric: Metric = DICE


def task_columns(config: Mapping[str, Any], task: str, ratio: float = 1.0) -> list[Column]:
    """Table 2 columns of one task: per size bucket and all (bucketed task), else one per class."""
    spec = config["tasks"][task]
    classes = list(spec["classes"])
    if spec.get("size_buckets_mm3"):
        title = class_title(classes[0])
        cols = [Column(task, f"{title} {short}", (classes[0],), bucket, ratio) for bucket, short in BUCKETS]
        return [*cols, Column(task, f"{title} all", (classes[0],), None, ratio)]
    return [Column(task, class_title(name), (name,), None, ratio) for name in classes]


def headline_column(config: Mapping[str, Any], task: str, ratio: float) -> Column:
    """A task's single number (Table 4): first class over all cases if bucketed, else the class average."""
    spec = config["tasks"][task]
    classes = tuple(spec["classes"])
    if spec.get("size_buckets_mm3"):
        return Column(task, f"{class_title(classes[0])} all {ratio_label(ratio)}", classes[:1], None, ratio)
    return Column(task, f"Average {ratio_label(ratio)}", classes, None, ratio)


def table_spec(config: Mapping[str, Any], name: str) -> TableSpec:
    if name in ("table2", "table2_hd95"):
        columns = [c for task in config["tasks"] for c in task_columns(config, task)]
        rows = table2_inits(config)
        if name == "table2":
            return TableSpec(name, "Table 2: Dice (%) on the test cases, label ratio 1", rows, columns)
        return TableSpec(name, "Table 2 (HD95): 95th-percentile Hausdorff distance (mm), label ratio 1", rows,
                         columns, HD95)
    if name == "table3":
        columns = [c for task in bucketed_tasks(config) for c in task_columns(config, task)]
        return TableSpec(name, "Table 3: single-scale vs multi-scale SAR pre-training, Dice (%), label ratio 1",
                         table3_inits(config), columns)
    if name == "table4":
        ratios = sorted(config["finetune"]["label_ratios"], reverse=True)
        columns = [headline_column(config, task, r) for task in config["tasks"] for r in ratios]
        return TableSpec(name, "Table 4: Dice (%) by fraction of annotated training cases",
                         table4_inits(config), columns)
    raise ValueError(f"unknown table '{name}' (known: table2, table2_hd95, table3, table4)")
