# Self-supervised pre-training: SAR, Models Genesis and the ablations, one job each.
# The resumable checkpoint is deliberately not an output: Snakemake deletes the
# outputs of failed jobs, and the checkpoint must survive to resume from.


rule pretrain:
    output:
        path(paths.PRETRAINED, method="{method}"),
    input:
        cubes=[path(paths.CUBES, dataset=d) for d in STUDY["pretrain"]["datasets"]],
        tracking=TRACKING,
    params:
        pretrain=settings("pretrain", "methods", "num_workers", "device"),
        seed=SEED,
        checkpoint=lambda wc: path(paths.PRETRAIN_CHECKPOINT, method=wc.method),
    # on the critical path: start as soon as the cubes exist, before fine-tuning from scratch
    priority: 10
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    log:
        log("pretrain", "{method}"),
    benchmark:
        bench("pretrain", "{method}"),
    shell:
        "SAR3D_RULE={rule} OMP_NUM_THREADS={threads} sar3d pretrain --config {STUDY_CONFIG} --method {wildcards.method}"
        " --cubes {input.cubes} --out {output} --checkpoint {params.checkpoint} > {log} 2>&1"
