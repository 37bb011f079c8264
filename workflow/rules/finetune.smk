# Fine-tuning: one job per (task, initialisation, label ratio, fold) of the study grid
# (sar3d.grid: which inits run at which ratios on which tasks).


def pretrained_input(wildcards):
    if wildcards.init == SCRATCH:
        return []
    return [path(paths.PRETRAINED, method=wildcards.init)]


rule finetune:
    output:
        path(paths.FINETUNED, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}"),
    input:
        split=path(paths.SPLIT, task="{task}", fold="{fold}"),
        data=path(paths.PREPROCESSED_TASK, task="{task}"),
        pretrained=pretrained_input,
        tracking=TRACKING,
    params:
        finetune=settings("finetune", "inits", "ablation_inits", "label_ratios", "device"),
        width=STUDY["pretrain"]["width"],
        seed=SEED,
        pretrained=lambda wc, input: f"--pretrained {input.pretrained}" if input.pretrained else "",
        checkpoint=lambda wc: path(
            paths.FINETUNE_CHECKPOINT, task=wc.task, init=wc.init, ratio=wc.ratio, fold=wc.fold
        ),
    threads: rule_threads("finetune")
    resources:
        **rule_resources("finetune"),
    log:
        log("finetune", "{task}-{init}-r{ratio}-fold{fold}"),
    benchmark:
        bench("finetune", "{task}-{init}-r{ratio}-fold{fold}"),
    shell:
        SAR3D + " finetune --config {STUDY_CONFIG} --task {wildcards.task} --init {wildcards.init}"
        " --ratio {wildcards.ratio} --fold {wildcards.fold} --split {input.split} --data {input.data}"
        " {params.pretrained} --out {output} --checkpoint {params.checkpoint} > {log} 2>&1"
