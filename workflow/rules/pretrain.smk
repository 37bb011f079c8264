# Self-supervised pre-training: one job per block of pretrain.methods, whatever its kind.
# Its inputs and params come from its kind (sar3d.pretraining.registry via common.smk), so
# adding a block reruns no other. The resumable checkpoint is deliberately not an output:
# Snakemake deletes the outputs of failed jobs, and the checkpoint must survive to resume from.


rule pretrain:
    output:
        path(paths.PRETRAINED, method="{method}"),
    input:
        unpack(pretrain_inputs),
    params:
        settings=lambda wc: registry.job_settings(STUDY, wc.method),
        seed=SEED,
        extra=pretrain_flags,
        checkpoint=lambda wc: path(paths.PRETRAIN_CHECKPOINT, method=wc.method),
    priority: CRITICAL_PATH
    threads: rule_threads("pretrain")
    resources:
        **rule_resources("pretrain"),
    log:
        log("pretrain", "{method}"),
    benchmark:
        bench("pretrain", "{method}"),
    shell:
        SAR3D + " pretrain --config {STUDY_CONFIG} --method {wildcards.method}"
        " --cubes {input.cubes} {params.extra} --out {output} --checkpoint {params.checkpoint} > {log} 2>&1"


# A method's cached per-volume artefact of one dataset (e.g. supervoxel regions), made once
# by the method's own make_artefact before any of its pre-training jobs.
rule pretrain_artefact:
    output:
        directory(path(paths.PRETRAIN_ARTEFACT, method="{method}", artefact="{artefact}", dataset="{dataset}")),
    input:
        volumes=path(paths.PREPROCESSED_PRETRAIN, dataset="{dataset}"),
    params:
        block=lambda wc: STUDY["pretrain"]["methods"][wc.method],
        seed=SEED,
    priority: CRITICAL_PATH
    threads: rule_threads("data")
    resources:
        **rule_resources("data"),
    log:
        log("pretrain_artefact", "{method}-{artefact}-{dataset}"),
    shell:
        SAR3D + " artefact --config {STUDY_CONFIG} --method {wildcards.method}"
        " --artefact {wildcards.artefact} --volumes {input.volumes} --out {output} > {log} 2>&1"
