"""The study as a DAG: every stage listed, a tiny end-to-end run, incremental reruns, MLflow.

One module-scoped tiny study is run once and then inspected by several tests,
since an end-to-end run is the expensive part. It runs as Slurm jobs through
``profiles/slurm`` on the local single-node test cluster wherever that can be
brought up (root; always in CI, where failing to is an error), else with the
local executor; the tests that need Slurm say why they skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm import fixtures as slurm_fixtures
from tinystudy import (
    REPO,
    UnfinishedFold,
    failure_report,
    local_env,
    mlflow_runs,
    planned_jobs,
    snakemake,
    snakemake_cmd,
    tiny_study,
    workflow_args,
)

pytestmark = [pytest.mark.slow]

STAGES = (
    "tracking_init", "download", "normalise_pretrain", "normalise_task", "split_brain_tumour",
    "split_pancreas", "cubes", "pretrain", "finetune", "evaluate", "report_table2", "report_table3", "report_table4",
    "figure_loss_curves", "figure_qualitative", "figure_restoration",
)
# Short jobs on a local cluster: poll often, fail fast, no shared filesystem to wait for.
SLURM_ARGS = (
    "--profile", str(slurm_fixtures.PROFILE), "--seconds-between-status-checks", "2",
    "--slurm-init-seconds-before-status-checks", "2", "--retries", "0", "--latency-wait", "5",
)
TRAINING_RULES = {"pretrain", "finetune", "evaluate"}


@dataclass
class Study:
    workdir: Path
    slurm: dict[str, str] | None  # the cluster's env when the study ran on Slurm
    why_local: str  # why it did not, otherwise


def run_on_slurm(study: Study, *args: str, timeout: float = 1200) -> None:
    assert study.slurm is not None
    proc = slurm_fixtures.run_snakemake(workflow_args(study.workdir, *SLURM_ARGS, *args), study.workdir,
                                        study.slurm, timeout=timeout)
    assert proc.returncode == 0, f"snakemake on Slurm failed:\n{failure_report(study.workdir, proc.stdout)}"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    workdir = tmp_path_factory.mktemp("study")
    config = tiny_study(Path("results"))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env, reason = slurm_fixtures.cluster_or_reason()
    out = Study(workdir, env, reason)
    if env is None:
        snakemake(workdir, "--cores", "2")
    else:
        run_on_slurm(out)
    return out


def test_dry_run_lists_every_stage(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_study(Path("results")), sort_keys=False))
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    for stage in STAGES:
        assert jobs.get(stage, 0) >= 1, f"stage {stage} missing from the dry run: {jobs}"
    # 2 inits x (1 brain trial + 2 pancreas folds) x 1 ratio, + the sar_s2 ablation on the brain trial
    assert jobs["finetune"] == jobs["evaluate"] == 7
    assert jobs["pretrain"] == 2


def test_default_study_plans_every_table_and_figure(tmp_path: Path) -> None:
    """The README's `make study` builds the whole grid of sar3d.grid, Tables 2-4 and every figure."""
    from sar3d.config import load_config
    from sar3d.grid import configured_tables, finetune_jobs

    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    config = load_config(REPO / "config.yaml")
    assert configured_tables(config) == ["table2", "table2_hd95", "table3", "table4"]
    assert jobs["finetune"] == jobs["evaluate"] == len(finetune_jobs(config))
    assert jobs["pretrain"] == len(config["pretrain"]["methods"])
    for rule in ("report_table2", "report_table3", "report_table4"):
        assert jobs[rule] == 1, rule
    assert jobs["figure_qualitative"] == len(config["tasks"])
    assert jobs["figure_loss_curves"] == len(config["tasks"]) * len(config["report"]["loss_curve_ratios"])
    assert jobs["figure_restoration"] == 1  # genesis and sar, no extra pre-training
    assert "probe" not in jobs and "report_probe" not in jobs  # probe.inits is empty by default


def test_make_evidence_dry_run_plans_the_whole_evidence_study(tmp_path: Path) -> None:
    """`make evidence -n` is Snakemake's dry run of the evidence overlay: every job of the study, nothing run."""
    import sys

    from sar3d.config import load_config
    from sar3d.grid import finetune_jobs
    from sar3d.reporting.probe import probe_files

    venv = Path(sys.executable).parent.parent
    # a results folder of its own: an evidence study already run in the checkout would plan nothing
    proc = subprocess.run(["make", "-n", "evidence", f"VENV={venv}", "CORES=2",
                           f"SNAKEMAKE_ARGS=--config results_dir={tmp_path / 'results'}"],
                          cwd=REPO, capture_output=True, text=True, env=local_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = planned_jobs(proc.stdout)
    overlay = yaml.safe_load((REPO / "config" / "evidence.yaml").read_text())
    config = load_config(REPO / "config.yaml", overlay)
    assert list(config["tasks"]) == ["brain_tumour"] and config["tasks"]["brain_tumour"]["split"]["n"] >= 5
    assert len(config["finetune"]["label_ratios"]) >= 3  # 1 and at least two of 1/2 ... 1/10
    assert set(config["finetune"]["inits"]) == set(config["probe"]["inits"]) == {"scratch", "genesis", "sar"}
    assert jobs["finetune"] == jobs["evaluate"] == len(finetune_jobs(config))
    assert jobs["probe"] == len(probe_files(config))
    assert jobs["pretrain"] == len(config["pretrain"]["methods"])
    for rule in ("report_table2", "report_table4", "report_probe", "figure_restoration", "figure_qualitative"):
        assert jobs[rule] == 1, rule
    assert jobs["figure_loss_curves"] == len(config["report"]["loss_curve_ratios"])
    assert not (tmp_path / "results").exists()  # planned, not run


def test_unknown_config_key_fails_before_any_job(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_study(Path("results")), sort_keys=False))
    proc = snakemake(tmp_path, "-n", "--config", "bogus_key=1", check=False)
    assert proc.returncode != 0
    assert "config key '<top level>': Additional properties are not allowed ('bogus_key'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "raw").exists()


def test_study_produces_every_table_and_figure(study: Study) -> None:
    results = study.workdir / "results"
    table = pd.read_csv(results / "tables" / "table2.csv")
    md = (results / "tables" / "table2.md").read_text()
    for method in ("scratch", "sar"):
        assert method in md.lower()
    assert len(table) >= 3
    table3 = pd.read_csv(results / "tables" / "table3.csv")
    assert set(table3["init"]) == {"sar_s2", "sar"} and set(table3["task"]) == {"brain_tumour"}
    assert (results / "tables" / "table4.md").exists()
    for name in ("loss_curves_pancreas_r1", "qualitative_brain_tumour", "table4_label_ratios", "restoration"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000, name
    assert "## Each initialisation vs Scratch" in md  # report.baselines
    # the probes: every level of both inits on every test case, SAR compared with the random-init floor
    probe = pd.read_csv(results / "tables" / "probe.csv")
    assert set(probe["init"]) == {"scratch", "sar"} and set(probe["task"]) == {"brain_tumour", "pancreas"}
    assert set(probe["level"]) == {"enc1", "enc2", "enc3", "enc4", "dec"}
    assert probe["mean"].between(0, 100).all()
    assert probe.loc[probe["init"] == "sar", "mean_diff_vs_scratch"].notna().all()
    per_case = pd.read_csv(results / "probe" / "pancreas" / "sar" / "r1" / "fold1.csv")
    split = yaml.safe_load((results / "splits" / "pancreas" / "fold1.json").read_text())
    assert set(per_case["case"]) == set(split["test"]) and set(per_case["class"]) == {"organ", "tumour"}
    # no finished-looking leftovers of atomic writes
    assert not list(results.rglob("*.partial*"))


def test_every_job_ran_as_a_slurm_job_with_its_resources(study: Study) -> None:
    if study.slurm is None:
        pytest.skip(f"the study ran with the local executor: {study.why_local}")
    runs = [r for r in mlflow_runs(study.workdir) if r.data.tags.get("stage") in TRAINING_RULES]
    job_ids = [r.data.tags.get("slurm_job_id", "") for r in runs]
    assert all(job_ids), "a training/evaluation run has no Slurm job id"
    assert len(set(job_ids)) == len(job_ids), "two runs share one Slurm job"
    assert set(job_ids) <= slurm_fixtures.submitted_job_ids(study.slurm)
    jobs = slurm_fixtures.slurm_jobs(study.slurm, job_ids)
    config = yaml.safe_load((study.workdir / "config.yaml").read_text())
    for run in runs:
        rule = run.data.tags["stage"]
        job = jobs[run.data.tags["slurm_job_id"]]
        assert job["state"] == "COMPLETED", job
        assert job["comment"].startswith(f"rule_{rule}"), job
        # the config's resources for the rule reached sbatch: CPUs, memory, time and a (fake) GPU
        wanted = config["resources"][rule]
        assert job["cpus"] == str(wanted["threads"]), job
        assert job["memory"] == f"{wanted['mem_mb']}M", job
        assert job["time_limit"] == f"{wanted['runtime']}:00", job
        assert job["gres"] == "gres:gpu:1", job


def test_second_run_does_nothing(study: Study) -> None:
    proc = snakemake(study.workdir, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_fold_reruns_only_its_dependents(study: Study) -> None:
    # Snakemake compares checksums of small inputs, so a bare `touch` that keeps the
    # content is (rightly) not a change; an edited split file is.
    fold = study.workdir / "results" / "splits" / "pancreas" / "fold1.json"
    original = fold.read_text()
    fold.write_text(original + "\n")
    try:
        jobs = planned_jobs(snakemake(study.workdir, "-n").stdout)
    finally:
        fold.write_text(original)  # same content again: nothing to rerun for the tests that follow
    assert jobs == {
        "finetune": 2, "evaluate": 2, "report_table2": 1, "report_table4": 1, "figure_loss_curves": 1,
        "probe": 2, "report_probe": 1, "all": 1,
    }, jobs
    assert "Nothing to be done" in snakemake(study.workdir, "-n").stdout


def test_mlflow_has_a_run_per_job_with_metrics(study: Study) -> None:
    import mlflow

    by_stage: dict[str, list] = {}
    for run in mlflow_runs(study.workdir):
        by_stage.setdefault(run.data.tags.get("stage", "?"), []).append(run)
    assert len(by_stage.get("pretrain", [])) == 2
    assert len(by_stage.get("finetune", [])) == 7
    assert len(by_stage.get("evaluate", [])) == 7
    for run in by_stage["pretrain"] + by_stage["finetune"] + by_stage["evaluate"]:
        assert run.info.status == "FINISHED"
        assert run.data.metrics, f"run {run.data.tags['job_key']} logged no metrics"
        assert run.data.params, f"run {run.data.tags['job_key']} logged no params"
    sar = next(r for r in by_stage["pretrain"] if r.data.tags.get("method") == "sar")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{study.workdir / 'results' / 'mlflow.db'}")
    history = client.get_metric_history(sar.info.run_id, "train/loss_res")
    assert len(history) == 2  # one point per epoch


def test_a_fold_killed_on_slurm_reruns_alone_and_resumes(study: Study) -> None:
    """A fold whose Slurm job is killed (SIGKILL, as on a node failure) reruns alone, from its checkpoint.

    Snakemake sees the job fail and stops; the rerun must plan only that
    fine-tuning and its evaluation (plus the tables), resume from the checkpoint,
    leave the other folds' outputs and MLflow runs untouched, and continue the
    killed job's MLflow run instead of adding one.
    """
    if study.slurm is None:
        pytest.skip(f"the study ran with the local executor: {study.why_local}")
    fold = UnfinishedFold.make(study.workdir)
    proc = subprocess.Popen(snakemake_cmd(study.workdir, *SLURM_ARGS, fold.target), env=study.slurm,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        fold.wait_for_checkpoint(proc)
        running = [j for j in slurm_fixtures.slurm_jobs(study.slurm).values()
                   if j["state"] == "RUNNING" and j["comment"].startswith("rule_finetune_wildcards_pancreas_sar_")]
        assert len(running) == 1, running
        subprocess.run(["scancel", "--signal=KILL", "--full", running[0]["id"]], env=study.slurm, check=True)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode != 0, f"snakemake did not notice the killed job:\n{out[-4000:]}"
    fold.check_killed()

    jobs = planned_jobs(snakemake(study.workdir, "-n").stdout)
    assert jobs.get("finetune") == 1 and jobs.get("evaluate") == 1, jobs
    run_on_slurm(study)
    fold.check_rerun()


def test_a_killed_local_fold_reruns_alone_and_resumes(study: Study) -> None:
    """The same with the local executor, snakemake itself SIGKILLed with its job (a laptop crash)."""
    fold = UnfinishedFold.make(study.workdir)
    cmd = snakemake_cmd(study.workdir, "--cores", "1", fold.target)
    proc = subprocess.Popen(cmd, env=local_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    fold.wait_for_checkpoint(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the training job, mid-run
    proc.wait()
    fold.check_killed()

    snakemake(study.workdir, "--unlock")  # a SIGKILLed snakemake leaves its lock behind
    jobs = planned_jobs(snakemake(study.workdir, "-n").stdout)
    assert jobs.get("finetune") == 1 and jobs.get("evaluate") == 1, jobs
    snakemake(study.workdir, "--cores", "2")
    fold.check_rerun()


def test_report_all_writes_every_table_from_a_partial_grid(study: Study) -> None:
    """`sar3d report-all` (the README's partial-grid recipe) rebuilds every configured table, the probe table
    included, from whichever files exist: a missing probe fold leaves its cells on the folds present."""
    results = study.workdir / "results"
    missing = results / "probe" / "pancreas" / "sar" / "r1" / "fold1.csv"
    kept = missing.read_bytes()
    tables = sorted(results.glob("tables/*.csv"))
    for table in tables:
        table.unlink()
    missing.unlink()
    try:
        proc = subprocess.run(["sar3d", "report-all", "--config", str(results / "config" / "study.yaml")],
                              cwd=study.workdir, capture_output=True, text=True, env=local_env(), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(results.glob("tables/*.csv")) == tables
        probe = pd.read_csv(results / "tables" / "probe.csv")
        pancreas_sar = probe[(probe["task"] == "pancreas") & (probe["init"] == "sar")]
        assert (pancreas_sar["n_folds"] == 1).all() and pancreas_sar["mean"].notna().all()
        full = probe.groupby("task")["n_folds"].transform("max")  # the brain task has fewer trials than pancreas folds
        scratch = probe["init"] == "scratch"
        assert (probe.loc[scratch, "n_folds"] == full[scratch]).all()
        assert (full[probe["task"] == "pancreas"] > 1).all()
    finally:
        missing.write_bytes(kept)
        snakemake(study.workdir, "--cores", "2")  # the tables back as the workflow writes them
