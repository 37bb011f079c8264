# Evaluation of one fine-tuned model on its held-out test cases.


rule evaluate:
    output:
        csv=path(paths.EVALUATION, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}"),
        summary=path(paths.EVALUATION_SUMMARY, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}"),
        predictions=directory(
            path(paths.EVALUATION_PREDICTIONS, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}")
        ),
    input:
        model=path(paths.FINETUNED, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}"),
        split=path(paths.SPLIT, task="{task}", fold="{fold}"),
        data=path(paths.PREPROCESSED_TASK, task="{task}"),
        tracking=TRACKING,
    params:
        evaluate=STUDY["evaluate"],
        buckets=lambda wc: STUDY["tasks"][wc.task].get("size_buckets_mm3"),
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    log:
        log("evaluate", "{task}-{init}-r{ratio}-fold{fold}"),
    benchmark:
        bench("evaluate", "{task}-{init}-r{ratio}-fold{fold}"),
    shell:
        SAR3D + " evaluate --config {STUDY_CONFIG} --task {wildcards.task} --init {wildcards.init}"
        " --ratio {wildcards.ratio} --fold {wildcards.fold} --split {input.split} --data {input.data}"
        " --model {input.model} --out {output.csv} --predictions {output.predictions} > {log} 2>&1"
