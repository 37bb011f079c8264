# The MLflow store and experiment, created once before jobs fan out so that
# parallel jobs never race to create the sqlite schema.


rule tracking_init:
    output:
        paths.fill(paths.TRACKING_READY, R),
    params:
        tracking=STUDY["tracking"],
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        log("tracking_init", "tracking"),
    shell:
        SAR3D + " tracking-init --config {STUDY_CONFIG} > {log} 2>&1"
