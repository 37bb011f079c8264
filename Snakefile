# sar3d: the SAR study as a DAG.
#   data -> normalisation -> splits -> multi-scale cubes -> pre-training
#        -> fine-tuning (per task, init, label ratio, fold) -> evaluation -> tables
#        (-> linear probes of the frozen inits, where probe.inits names any)
# Rules only wire paths to `sar3d <stage>` commands; all logic is in src/sar3d.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/normalise.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/cubes.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/report.smk"


# The target rule only collects files: never a cluster job of its own.
localrules:
    all,


rule all:
    default_target: True
    input:
        report_outputs(),
