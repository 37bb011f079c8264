# Linear probes of each probe init's frozen features, per (task, init, fold) at the study's smallest
# label ratio (sar3d.evaluation.probe), and their table (sar3d.reporting.probe).


rule probe:
    output:
        path(paths.PROBE, task="{task}", init="{init}", ratio="{ratio}", fold="{fold}"),
    input:
        split=path(paths.SPLIT, task="{task}", fold="{fold}"),
        data=path(paths.PREPROCESSED_TASK, task="{task}"),
        pretrained=pretrained_input,
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
        probe=settings("probe", "inits"),
        width=STUDY["pretrain"]["width"],
        seed=SEED,
        pretrained=lambda wc, input: f"--pretrained {input.pretrained}" if input.pretrained else "",
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    log:
        log("probe", "{task}-{init}-r{ratio}-fold{fold}"),
    benchmark:
        bench("probe", "{task}-{init}-r{ratio}-fold{fold}"),
    shell:
        "sar3d probe --config {params.config} --task {wildcards.task} --init {wildcards.init}"
        " --ratio {wildcards.ratio} --fold {wildcards.fold} --split {input.split} --data {input.data}"
        " {params.pretrained} --out {output} > {log} 2>&1"


rule report_probe:
    output:
        csv=report(table_path("probe"), caption="../report/probe.rst", category="Tables"),
        md=report(table_path("probe", "md"), caption="../report/probe.rst", category="Tables"),
    input:
        probes=[str(p) for p in probe_files(STUDY)],
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
        **REPORT_PARAMS,
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("report", "probe"),
    shell:
        "sar3d report --config {params.config} --table probe --evaluations {input.probes}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
