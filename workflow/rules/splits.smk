# Splits: one file per fold or trial, so touching one fold reruns only that fold,
# plus the union of test cases that pre-training must never see and, for a task
# with size buckets, their thresholds. Tasks differ in their number of folds, so
# each task gets its own rule.

for _task, _spec in STUDY["tasks"].items():

    rule:
        name:
            f"split_{_task}"
        output:
            folds=[path(paths.SPLIT, task=_task, fold=k) for k in task_folds(_task)],
            heldout=path(paths.HELDOUT, task=_task),
            # thresholds of a bucketed task (auto: computed here), read by the tables
            buckets=[path(paths.SIZE_BUCKETS, task=_task)] if _spec.get("size_buckets_mm3") else [],
        input:
            data=path(paths.PREPROCESSED_TASK, task=_task),
            tracking=TRACKING,
        params:
            task=_task,
            split=_spec["split"],
            buckets=_spec.get("size_buckets_mm3"),
            seed=SEED,
            out_dir=str(paths.fill(paths.HELDOUT, R, task=_task).parent),
        priority: CRITICAL_PATH  # the held-out list gates the cubes
        log:
            log("split", _task),
        shell:
            SAR3D + " split --config {STUDY_CONFIG} --task {params.task}"
            " --data {input.data} --out-dir {params.out_dir} > {log} 2>&1"
