"""The study's fine-tuning grid: every (task, init, label ratio, fold) job, and which table reads which.

The paper does not cross everything with everything, and neither does the study:

* ``finetune.inits`` (scratch, Genesis, SAR, ...) run on every task at every
  ``finetune.label_ratios`` entry: Table 2 reads label ratio 1, Table 4 and its
  figure read every ratio, the loss-curve and qualitative figures ratio 1.
* ``finetune.ablation_inits`` (the single-scale SAR variants of Table 3) run only
  on the tasks with ``size_buckets_mm3`` (the brain task) and only at label
  ratio 1, next to the reference init of ``report.reference``.

Which table an init's rows go to and in which order is its method's role and
rank (:mod:`sar3d.pretraining.registry`): rows follow the paper's order whatever
the config's.

The Snakemake rules and ``sar3d report-all`` both take their file lists from
here, so the DAG and the tables always expect the same evaluations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sar3d.paths import ratio_tag
from sar3d.pretraining.base import MAIN, SCALE_ABLATION
from sar3d.pretraining.registry import describe, table_order

FULL_LABELS = "1"  # ratio tag of the full training split


@dataclass(frozen=True, order=True)
class FinetuneJob:
    """One fine-tuning (and its evaluation): a Snakemake job and an MLflow run each."""

    task: str
    init: str
    ratio: str  # ratio tag, e.g. "1", "0.2"
    fold: int


def bucketed_tasks(config: Mapping[str, Any]) -> list[str]:
    """Tasks whose test cases fall into tumour-size buckets (Table 3 is reported on these)."""
    return [t for t, spec in config["tasks"].items() if spec.get("size_buckets_mm3")]


def ratio_tags(config: Mapping[str, Any]) -> list[str]:
    return [ratio_tag(r) for r in config["finetune"]["label_ratios"]]


def all_inits(config: Mapping[str, Any]) -> list[str]:
    """Every initialisation the study fine-tunes from, main grid first."""
    return list(dict.fromkeys([*config["finetune"]["inits"], *config["finetune"]["ablation_inits"]]))


def table2_inits(config: Mapping[str, Any]) -> list[str]:
    """Rows of Table 2: the main inits (not the scale ablations), in the paper's order."""
    return table_order(config, [i for i in config["finetune"]["inits"] if describe(config, i).role == MAIN])


def table3_inits(config: Mapping[str, Any]) -> list[str]:
    """The scale-ablation inits anywhere in the study, then the multi-scale reference; [] without any."""
    single = table_order(config, [i for i in all_inits(config) if describe(config, i).role == SCALE_ABLATION])
    return [*single, config["report"]["reference"]] if single and bucketed_tasks(config) else []


def table4_inits(config: Mapping[str, Any]) -> list[str]:
    """Rows of Table 4 (every label ratio): ``finetune.inits`` in the paper's order."""
    return table_order(config, list(config["finetune"]["inits"]))


def finetune_jobs(
    config: Mapping[str, Any],
    tasks: Iterable[str] | None = None,
    inits: Iterable[str] | None = None,
    ratios: Iterable[str] | None = None,
) -> list[FinetuneJob]:
    """The study's jobs, optionally only those of some tasks / inits / ratio tags (sorted, unique)."""
    main = [(init, tag) for init in config["finetune"]["inits"] for tag in ratio_tags(config)]
    ablation = [(init, FULL_LABELS) for init in config["finetune"]["ablation_inits"]]
    bucketed = bucketed_tasks(config)
    jobs = set()
    for task, spec in config["tasks"].items():
        pairs = main + ablation if task in bucketed else main
        jobs.update(FinetuneJob(task, init, tag, fold) for fold in range(spec["split"]["n"]) for init, tag in pairs)
    tasks, inits, ratios = (None if x is None else set(x) for x in (tasks, inits, ratios))
    return sorted(
        j for j in jobs
        if (tasks is None or j.task in tasks) and (inits is None or j.init in inits)
        and (ratios is None or j.ratio in ratios)
    )


def table_jobs(config: Mapping[str, Any], table: str) -> list[FinetuneJob]:
    """The jobs whose evaluations a table reads."""
    if table in ("table2", "table2_hd95"):
        return finetune_jobs(config, inits=table2_inits(config), ratios=[FULL_LABELS])
    if table == "table3":
        return finetune_jobs(config, tasks=bucketed_tasks(config), inits=table3_inits(config), ratios=[FULL_LABELS])
    if table == "table4":
        return finetune_jobs(config, inits=config["finetune"]["inits"])
    raise ValueError(f"unknown table '{table}' (known: table2, table2_hd95, table3, table4)")


def configured_tables(config: Mapping[str, Any]) -> list[str]:
    """Names of the tables this config produces (Table 3 only with a single-scale init and a bucketed task)."""
    return ["table2", "table2_hd95", *(["table3"] if table3_inits(config) else []), "table4"]
