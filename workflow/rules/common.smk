# Shared wiring: the resolved study config, path templates and the job grid.
# Path templates live in sar3d.paths so rules and Python code never disagree.

from dataclasses import asdict

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from sar3d import grid, paths, slurm
from sar3d.config import ConfigError, resources_for, validate_config
from sar3d.pretraining import registry
from sar3d.pretraining.base import VOLUMES
from sar3d.pretraining.registry import SCRATCH

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

# Every rule runs `sar3d <stage>` behind this prefix: the rule name for MLflow's `rule`
# tag, and OpenMP limited to the job's threads.
SAR3D = "SAR3D_RULE={rule} OMP_NUM_THREADS={threads} sar3d"

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
# applied), so `sar3d` commands see exactly what Snakemake validated. It is not a
# rule input: each rule lists the config sections it depends on as params, so a
# config change reruns only the jobs it concerns.
STUDY_CONFIG = _write_if_changed(f"{R}/config/study.yaml", yaml.safe_dump(STUDY, sort_keys=False))
TRACKING = ancient(paths.fill(paths.TRACKING_READY, R))


def settings(section, *grid_keys):
    """A config section minus the keys that only enlarge the job grid.

    Used as rule params so a config change reruns exactly the jobs it concerns:
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



wildcard_constraints:
    dataset="|".join(STUDY["datasets"]),
    task="|".join(STUDY["tasks"]),
    method="|".join(STUDY["pretrain"]["methods"]),
    init="|".join(grid.all_inits(STUDY)),
    artefact=r"[A-Za-z0-9_]+",
    fold=r"\d+",
    ratio=r"[0-9.]+",
