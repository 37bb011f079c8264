# Tables and figures of the paper from the study grid (sar3d.reporting.report, sar3d.reporting.figures),
# and the restoration figure of the pre-trained models (sar3d.reporting.restoration).
# Inputs are the evaluations, so the DAG builds them. For a partial grid (some jobs
# failed): `snakemake --keep-going`, then `sar3d report-all --config results/config/study.yaml`
# writes every table and figure from whichever evaluations exist, marking the rest "—".


rule report_table2:
    output:
        csv=report(path(paths.TABLE2), caption="../report/table2.rst", category="Tables"),
        md=report(path(paths.TABLE2_MD), caption="../report/table2.rst", category="Tables"),
        hd95_csv=report(table_path("table2_hd95"), caption="../report/table2_hd95.rst", category="Tables"),
        hd95_md=report(table_path("table2_hd95", "md"), caption="../report/table2_hd95.rst", category="Tables"),
    input:
        evaluations=evaluation_files("table2"),
        buckets=bucket_files(),
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
        **REPORT_PARAMS,
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("report", "table2"),
    shell:
        "(sar3d report --config {params.config} --evaluations {input.evaluations}"
        " --out-csv {output.csv} --out-md {output.md}"
        " && sar3d report --config {params.config} --table table2_hd95 --evaluations {input.evaluations}"
        " --out-csv {output.hd95_csv} --out-md {output.hd95_md}) > {log} 2>&1"


rule report_table3:
    output:
        csv=report(table_path("table3"), caption="../report/table3.rst", category="Tables"),
        md=report(table_path("table3", "md"), caption="../report/table3.rst", category="Tables"),
    input:
        evaluations=evaluation_files("table3"),
        buckets=bucket_files(),
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
        **REPORT_PARAMS,
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("report", "table3"),
    shell:
        "sar3d report --config {params.config} --table table3 --evaluations {input.evaluations}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule report_table4:
    output:
        csv=report(table_path("table4"), caption="../report/table4.rst", category="Tables"),
        md=report(table_path("table4", "md"), caption="../report/table4.rst", category="Tables"),
        png=report(figure_path("table4_label_ratios", "png"), caption="../report/table4.rst", category="Figures"),
        svg=figure_path("table4_label_ratios", "svg"),
    input:
        evaluations=evaluation_files("table4"),
        buckets=bucket_files(),
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
        **REPORT_PARAMS,
        ratios=STUDY["finetune"]["label_ratios"],
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("report", "table4"),
    shell:
        "sar3d report --config {params.config} --table table4 --evaluations {input.evaluations}"
        " --out-csv {output.csv} --out-md {output.md} --out-figure {output.png} {output.svg} > {log} 2>&1"


rule figure_loss_curves:
    output:
        png=report(figure_path("loss_curves_{task}_r{ratio}", "png"), caption="../report/loss_curves.rst",
                   category="Figures", subcategory="{task}"),
        svg=figure_path("loss_curves_{task}_r{ratio}", "svg"),
    input:
        # the curves are read from MLflow; the models order this job after every fine-tuning run
        models=lambda wc: [
            path(paths.FINETUNED, task=j.task, init=j.init, ratio=j.ratio, fold=j.fold)
            for j in grid.finetune_jobs(STUDY, tasks=[wc.task], ratios=[wc.ratio])
        ],
        tracking=TRACKING,
    params:
        config=STUDY_CONFIG,
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("figure", "loss_curves_{task}_r{ratio}"),
    shell:
        "sar3d figure --config {params.config} --kind loss --task {wildcards.task} --ratio {wildcards.ratio}"
        " --out {output.png} {output.svg} > {log} 2>&1"


rule figure_qualitative:
    output:
        png=report(figure_path("qualitative_{task}", "png"), caption="../report/qualitative.rst", category="Figures",
                   subcategory="{task}"),
        svg=figure_path("qualitative_{task}", "svg"),
    input:
        predictions=lambda wc: [prediction_folder(wc.task, init) for init in STUDY["finetune"]["inits"]],
        split=path(paths.SPLIT, task="{task}", fold="0"),
        data=path(paths.PREPROCESSED_TASK, task="{task}"),
    params:
        config=STUDY_CONFIG,
        predictions=lambda wc: " ".join(
            f"--prediction {init} {prediction_folder(wc.task, init)}" for init in STUDY["finetune"]["inits"]
        ),
        cases=STUDY["evaluate"]["save_predictions"],
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("figure", "qualitative_{task}"),
    shell:
        "sar3d figure --config {params.config} --kind qualitative --task {wildcards.task} --data {input.data}"
        " --split {input.split} {params.predictions} --out {output.png} {output.svg} > {log} 2>&1"


rule figure_restoration:
    output:
        png=report(figure_path(RESTORATION_FIGURE, "png"), caption="../report/restoration.rst",
                   category="Figures"),
        svg=figure_path(RESTORATION_FIGURE, "svg"),
    input:
        models=restoration_models(),
        cubes=cube_folders(),
    params:
        config=STUDY_CONFIG,
        models=restoration_flags(),
        transforms=STUDY["pretrain"]["transforms"],
        width=STUDY["pretrain"]["width"],
        seed=SEED,
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("figure", RESTORATION_FIGURE),
    shell:
        "sar3d figure --config {params.config} --kind restoration {params.models} --cubes {input.cubes}"
        " --out {output.png} {output.svg} > {log} 2>&1"


rule report_all:
    input:
        report_outputs(),
