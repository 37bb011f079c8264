# Multi-scale cubes of one pre-training dataset. The held-out test cases of every
# task built on the same dataset are inputs, so they are excluded explicitly.


rule cubes:
    output:
        directory(path(paths.CUBES, dataset="{dataset}")),
    input:
        data=path(paths.PREPROCESSED_PRETRAIN, dataset="{dataset}"),
        heldout=lambda wc: [path(paths.HELDOUT, task=t) for t in tasks_of_dataset(wc.dataset)],
        tracking=TRACKING,
    params:
        cubes=STUDY["cubes"],
        seed=SEED,
    priority: CRITICAL_PATH
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("cubes", "{dataset}"),
    shell:
        SAR3D + " cubes --config {STUDY_CONFIG} --dataset {wildcards.dataset} --data {input.data}"
        " --heldout {input.heldout} --out {output} > {log} 2>&1"
