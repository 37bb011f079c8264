# Shared wiring: the resolved study config, path templates and the job grid.
# Path templates live in sar3d.paths so rules and Python code never disagree.

import os
from dataclasses import asdict

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from sar3d import grid, paths, slurm
from sar3d.config import ConfigError, drop_removed, resources_for, validate_config
from sar3d.pretraining import registry
from sar3d.pretraining.base import VOLUMES
from sar3d.pretraining.registry import SCRATCH
from sar3d.reporting.figures import loss_curve_name
from sar3d.reporting.probe import probe_files
from sar3d.reporting.restoration import FIGURE as RESTORATION_FIGURE
from sar3d.reporting.restoration import restoration_methods

# An overlay's null entries remove what config.yaml defines (sar3d.config.REMOVABLE), here
# in Snakemake's own config too, so `validate` below sees the same study.
drop_removed(config)
# sar3d's own check first: it names the offending key in one line (and cross-checks
# datasets, tasks and methods); then Snakemake's validate fills schema defaults.
try:
    STUDY = validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, "../schemas/config.schema.yaml")
R = STUDY["results_dir"]

# A Slurm partition that does not exist fails here, naming the profile key, not in
# every sbatch call. Only where Snakemake itself runs (jobs re-parse this file) and
# only where `sinfo` answers; no partition set means the cluster's default one.
if workflow.is_main_process:
    try:
        slurm.check_partitions(slurm.requested_partitions(workflow.resource_settings))
    except ConfigError as err:
        raise WorkflowError(str(err)) from None

# One image for every rule (Snakemake's global directive; rules defined after this
# line inherit it). Only `--software-deployment-method apptainer` uses it, so dry
# runs and local runs need no Apptainer; `container: null` in the config clears it.
container: STUDY["container"]

SEED = STUDY["seed"]


# Rules upstream of pre-training (the critical path) start ahead of fine-tuning from scratch.
CRITICAL_PATH = 10


def _write_if_changed(path, text):
    """Keep the resolved config's mtime stable so reruns only follow real changes."""
    from pathlib import Path

    path = Path(path)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


# Every job reads the same resolved config (defaults filled, --config overrides
# applied), so `sar3d` commands see exactly what Snakemake validated. It is written
# when a run starts (not while the workflow is parsed, so `-n` and `--lint` write
# nothing) and is not an input of any rule: each rule passes its path as `params.config` and lists
# the config sections it depends on as params, so a config change reruns only the jobs
# it concerns. (Snakemake itself sets OMP_NUM_THREADS and friends to the job's threads.)
STUDY_CONFIG = str(paths.fill(paths.STUDY_CONFIG, R))


onstart:
    _write_if_changed(STUDY_CONFIG, yaml.safe_dump(STUDY, sort_keys=False))


TRACKING = ancient(paths.fill(paths.TRACKING_READY, R))


def settings(section, *grid_keys):
    """A config section minus the keys that only enlarge the job grid.

    Used as params of the rules, so a config change reruns exactly the jobs it concerns:
    adding a method or a label ratio adds jobs, it does not rerun the others.
    """
    return {k: v for k, v in STUDY[section].items() if k not in grid_keys and k != "resources"}


def path(template, **wildcards):
    return str(paths.fill(template, R, **wildcards))


def task_folds(task):
    return list(range(STUDY["tasks"][task]["split"]["n"]))


def tasks_of_dataset(dataset):
    return [t for t, spec in STUDY["tasks"].items() if spec["dataset"] == dataset]


def log(rule_name, name):
    return str(paths.fill(paths.LOGS, R, rule=rule_name, name=name))


def bench(rule_name, name):
    """Per-job wall time, memory and CPU time, for sizing `resources:` (docs/cluster.md)."""
    return str(paths.fill(paths.BENCHMARKS, R, rule=rule_name, name=name))


def rule_resources(group):
    """Rule resources from config; memory and time grow with each retry attempt."""
    spec = resources_for(STUDY, group)
    out = {
        "mem_mb": lambda wildcards, attempt: spec["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: spec["runtime"] * attempt,
    }
    if spec["gpu"]:
        out["gpu"] = spec["gpu"]
    return out


def rule_threads(group):
    return resources_for(STUDY, group)["threads"]


def pretrain_inputs(wildcards):
    """A pre-training job's inputs: the cube shards (they fix every case's split), and the
    normalised volumes and artefact folders when its kind declares them."""
    cls = registry.method_class(STUDY, wildcards.method)
    datasets = list(STUDY["pretrain"]["datasets"])
    out = {"cubes": [path(paths.CUBES, dataset=d) for d in datasets], "tracking": TRACKING}
    if cls.input == VOLUMES:
        out["volumes"] = [path(paths.PREPROCESSED_PRETRAIN, dataset=d) for d in datasets]
    for artefact in cls.artefacts:
        out[f"artefact_{artefact}"] = [
            path(paths.PRETRAIN_ARTEFACT, method=wildcards.method, artefact=artefact, dataset=d) for d in datasets
        ]
    return out


def pretrain_flags(wildcards, input):
    """`sar3d pretrain` flags for the volume and artefact inputs of :func:`pretrain_inputs`."""
    cls = registry.method_class(STUDY, wildcards.method)
    flags = [f"--volumes {' '.join(input.volumes)}"] if cls.input == VOLUMES else []
    for artefact in cls.artefacts:
        flags += [f"--artefact {artefact}={folder}" for folder in input[f"artefact_{artefact}"]]
    return " ".join(flags)



# Inputs of fine-tuning and of the report rules.

def pretrained_input(wildcards):
    if wildcards.init == SCRATCH:
        return []
    return [path(paths.PRETRAINED, method=wildcards.init)]


def evaluation_files(table):
    """Evaluation CSVs of the jobs a table reads (sar3d.grid)."""
    return [
        path(paths.EVALUATION, task=j.task, init=j.init, ratio=j.ratio, fold=j.fold)
        for j in grid.table_jobs(STUDY, table)
    ]


def bucket_files():
    """Size-bucket thresholds of the bucketed tasks (their footnotes; auto thresholds exist only there)."""
    return [path(paths.SIZE_BUCKETS, task=task) for task in grid.bucketed_tasks(STUDY)]


def table_path(name, ext="csv"):
    return path(paths.TABLE if ext == "csv" else paths.TABLE_MD, table=name)


def prediction_folder(task, init):
    """Saved predictions of fold 0 at label ratio 1: what the qualitative figure shows."""
    return path(paths.EVALUATION_PREDICTIONS, task=task, init=init, ratio="1", fold=0)


def figure_path(name, ext):
    return path(paths.FIGURE, figure=name, ext=ext)


# the rows' names and order come from the methods' blocks (a renamed row reruns the tables);
# which models the restoration figure shows concerns no table
REPORT_PARAMS = {
    "report": {k: v for k, v in STUDY["report"].items() if k != "restoration_methods"},
    "tasks": STUDY["tasks"],
    "inits": {init: asdict(registry.describe(STUDY, init)) for init in grid.all_inits(STUDY)},
}


# The restoration figure's columns: restoration methods the study pre-trains (config errors name the key).
try:
    RESTORATION_METHODS = restoration_methods(STUDY)
except ConfigError as err:
    raise WorkflowError(str(err)) from None


def restoration_models():
    """The pre-trained models the restoration figure shows, in its columns' order."""
    return [path(paths.PRETRAINED, method=method) for method in RESTORATION_METHODS]


def restoration_flags():
    """`sar3d figure --kind restoration` flags naming each model's method."""
    return " ".join(f"--model {m} {f}" for m, f in zip(RESTORATION_METHODS, restoration_models(), strict=True))


def cube_folders():
    """The cube shards of every pre-training dataset (the restoration figure's validation cubes)."""
    return [path(paths.CUBES, dataset=d) for d in STUDY["pretrain"]["datasets"]]


def report_outputs():
    """Every configured table and figure: the default target."""
    out = []
    for name in grid.configured_tables(STUDY):
        out += [table_path(name), table_path(name, "md")]
    for ext in ("png", "svg"):
        out.append(figure_path("table4_label_ratios", ext))
        if RESTORATION_METHODS:
            out.append(figure_path(RESTORATION_FIGURE, ext))
        for task in STUDY["tasks"]:
            out.append(figure_path(f"qualitative_{task}", ext))
            out += [figure_path(loss_curve_name(task, r), ext) for r in STUDY["report"]["loss_curve_ratios"]]
    if STUDY["probe"]["inits"]:
        out += [table_path("probe"), table_path("probe", "md")]
    return out


wildcard_constraints:
    dataset="|".join(STUDY["datasets"]),
    task="|".join(STUDY["tasks"]),
    method="|".join(STUDY["pretrain"]["methods"]),
    init="|".join(dict.fromkeys([*grid.all_inits(STUDY), *STUDY["probe"]["inits"]])),
    artefact=r"[A-Za-z0-9_]+",
    fold=r"\d+",
    ratio=r"[0-9.]+",
