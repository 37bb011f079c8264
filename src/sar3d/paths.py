"""Where every stage reads and writes: one place, used by the Snakefile and the CLI.

Templates use Snakemake wildcard syntax so the rules and the Python code can
never disagree on a path.
"""

from __future__ import annotations

from pathlib import Path

RAW = "{results}/raw/{dataset}"
PREPROCESSED_PRETRAIN = "{results}/preprocessed/pretrain/{dataset}"
PREPROCESSED_TASK = "{results}/preprocessed/tasks/{task}"
SPLIT = "{results}/splits/{task}/fold{fold}.json"
HELDOUT = "{results}/splits/{task}/heldout.json"
# Thresholds of a bucketed task (auto: computed by the split) and how they were set.
SIZE_BUCKETS = "{results}/splits/{task}/size_buckets.json"
CUBES = "{results}/cubes/{dataset}"
PRETRAINED = "{results}/models/pretrain/{method}/model.pt"
PRETRAIN_CHECKPOINT = "{results}/models/pretrain/{method}/checkpoint.pt"
PRETRAIN_ARTEFACT = "{results}/artefacts/{method}/{artefact}/{dataset}"  # a method's cached per-volume files
FINETUNED = "{results}/models/finetune/{task}/{init}/r{ratio}/fold{fold}/model.pt"
FINETUNE_CHECKPOINT = "{results}/models/finetune/{task}/{init}/r{ratio}/fold{fold}/checkpoint.pt"
EVALUATION = "{results}/eval/{task}/{init}/r{ratio}/fold{fold}.csv"
EVALUATION_SUMMARY = "{results}/eval/{task}/{init}/r{ratio}/fold{fold}.json"
EVALUATION_PREDICTIONS = "{results}/eval/{task}/{init}/r{ratio}/fold{fold}_pred"
# Linear probes of an init's frozen features (sar3d.evaluation.probe): Dice per test case, class, level.
PROBE = "{results}/probe/{task}/{init}/r{ratio}/fold{fold}.csv"
TABLE2 = "{results}/tables/table2.csv"
TABLE2_MD = "{results}/tables/table2.md"
TABLE = "{results}/tables/{table}.csv"
TABLE_MD = "{results}/tables/{table}.md"
FIGURE = "{results}/figures/{figure}.{ext}"
STUDY_CONFIG = "{results}/config/study.yaml"  # the resolved config every job reads
TRACKING_READY = "{results}/mlflow/experiment.json"
LOGS = "{results}/logs/{rule}/{name}.log"
# Snakemake `benchmark:` files (wall time, max RSS, CPU time per job): sizes Slurm requests.
BENCHMARKS = "{results}/benchmarks/{rule}/{name}.tsv"

# Manifest written last inside every dataset folder: its presence marks the folder complete.
MANIFEST = "manifest.json"


def ratio_tag(ratio: float) -> str:
    """Stable wildcard text for a label ratio: 1 -> '1', 0.5 -> '0.5', 0.02 -> '0.02'."""
    return f"{ratio:g}"


def fill(template: str, results: str | Path, **wildcards: object) -> Path:
    """Fill a template with the results folder and wildcards."""
    return Path(template.format(results=results, **wildcards))
