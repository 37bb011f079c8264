# Normalisation: 1 mm resampling, then pre-training ([0, 1]) or task normalisation.


rule normalise_pretrain:
    output:
        directory(path(paths.PREPROCESSED_PRETRAIN, dataset="{dataset}")),
    input:
        raw=path(paths.RAW, dataset="{dataset}"),
        tracking=TRACKING,
    params:
        preprocess=STUDY["preprocess"],
        channels=lambda wc: STUDY["pretrain"]["datasets"].get(wc.dataset),
    priority: CRITICAL_PATH
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("normalise_pretrain", "{dataset}"),
    shell:
        SAR3D + " normalise --config {STUDY_CONFIG} --dataset {wildcards.dataset}"
        " --raw {input.raw} --out {output} > {log} 2>&1"


rule normalise_task:
    output:
        directory(path(paths.PREPROCESSED_TASK, task="{task}")),
    input:
        raw=lambda wc: path(paths.RAW, dataset=STUDY["tasks"][wc.task]["dataset"]),
        tracking=TRACKING,
    params:
        preprocess=STUDY["preprocess"],
        task=lambda wc: {k: v for k, v in STUDY["tasks"][wc.task].items() if k != "split"},
    priority: CRITICAL_PATH
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("normalise_task", "{task}"),
    shell:
        SAR3D + " normalise --config {STUDY_CONFIG} --task {wildcards.task}"
        " --raw {input.raw} --out {output} > {log} 2>&1"
