# Data: generate the phantom, fetch an MSD task, or link an existing folder.


rule download:
    output:
        directory(path(paths.RAW, dataset="{dataset}")),
    input:
        TRACKING,
    params:
        dataset=lambda wc: STUDY["datasets"][wc.dataset],
        seed=SEED,
    # upstream of pre-training (the critical path): ahead of fine-tuning from scratch
    priority: 10
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("download", "{dataset}"),
    shell:
        "SAR3D_RULE={rule} OMP_NUM_THREADS={threads} sar3d download --config {STUDY_CONFIG} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
