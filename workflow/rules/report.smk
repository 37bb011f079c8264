# Tables: the paper's Table 2 from every evaluation of the study grid.


def evaluation_files():
    return [
        path(paths.EVALUATION, task=task, init=init, ratio=ratio, fold=fold)
        for task in STUDY["tasks"]
        for init in STUDY["finetune"]["inits"]
        for ratio in ratio_tags()
        for fold in task_folds(task)
    ]


def table2_outputs():
    return [path(paths.TABLE2), path(paths.TABLE2_MD)]


rule report_table2:
    output:
        csv=report(path(paths.TABLE2), caption="../report/table2.rst", category="Tables"),
        md=path(paths.TABLE2_MD),
    input:
        evaluations=evaluation_files(),
        tracking=TRACKING,
    params:
        tasks=STUDY["tasks"],
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("report", "table2"),
    shell:
        "sar3d report --config {STUDY_CONFIG} --evaluations {input.evaluations}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
