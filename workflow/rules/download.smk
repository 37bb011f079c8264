# Data: generate the phantom, fetch an MSD task, or link an existing folder.


rule download:
    output:
        directory(path(paths.RAW, dataset="{dataset}")),
    input:
        TRACKING,
    params:
        dataset=lambda wc: STUDY["datasets"][wc.dataset],
        seed=SEED,
    priority: CRITICAL_PATH
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("download", "{dataset}"),
    shell:
        SAR3D + " download --config {STUDY_CONFIG} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
