"""The study as a DAG: every stage listed, a tiny end-to-end run, incremental reruns, MLflow.

One module-scoped tiny study is run once and then inspected by several tests,
since an end-to-end run is the expensive part.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tinystudy import REPO, tiny_study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("workflow")]

STAGES = (
    "tracking_init", "download", "normalise_pretrain", "normalise_task", "split_brain_tumour",
    "split_pancreas", "cubes", "pretrain", "finetune", "evaluate", "report_table2", "report_table4",
    "figure_loss_curves", "figure_qualitative",
)


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in workdir.glob("results/logs/*/*.log"))
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-6000:]}\n{logs[-12000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """Job counts per rule from a dry run's job stats table."""
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("study")
    config = tiny_study(Path("results"))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    return workdir


def test_dry_run_lists_every_stage(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_study(Path("results")), sort_keys=False))
    jobs = planned_jobs(snakemake(tmp_path, "-n"))
    for stage in STAGES:
        assert jobs.get(stage, 0) >= 1, f"stage {stage} missing from the dry run: {jobs}"
    # 3 inits x (1 brain trial + 2 pancreas folds) x 1 ratio
    assert jobs["finetune"] == 9
    assert jobs["evaluate"] == 9


def test_unknown_config_key_fails_before_any_job(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_study(Path("results")), sort_keys=False))
    proc = snakemake(tmp_path, "-n", "--config", "bogus_key=1", check=False)
    assert proc.returncode != 0
    assert "config key '<top level>': Additional properties are not allowed ('bogus_key'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "raw").exists()


def test_study_produces_table2(study: Path) -> None:
    table = pd.read_csv(study / "results" / "tables" / "table2.csv")
    md = (study / "results" / "tables" / "table2.md").read_text()
    for method in ("scratch", "genesis", "sar"):
        assert method in md.lower()
    assert len(table) >= 3
    for name in ("loss_curves_pancreas", "qualitative_brain_tumour", "table4_label_ratios"):
        assert (study / "results" / "figures" / f"{name}.png").stat().st_size > 1000, name
    # no finished-looking leftovers of atomic writes
    assert not list((study / "results").rglob("*.partial*"))


def test_second_run_does_nothing(study: Path) -> None:
    proc = snakemake(study, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_fold_reruns_only_its_dependents(study: Path) -> None:
    # Snakemake compares checksums of small inputs, so a bare `touch` that keeps the
    # content is (rightly) not a change; an edited split file is.
    fold = study / "results" / "splits" / "pancreas" / "fold1.json"
    original = fold.read_text()
    fold.write_text(original + "\n")
    try:
        jobs = planned_jobs(snakemake(study, "-n"))
    finally:
        fold.write_text(original)  # same content again: nothing to rerun for the tests that follow
    assert jobs == {
        "finetune": 3, "evaluate": 3, "report_table2": 1, "report_table4": 1, "figure_loss_curves": 1, "all": 1
    }, jobs
    assert "Nothing to be done" in snakemake(study, "-n").stdout


def test_mlflow_has_a_run_per_job_with_metrics(study: Path) -> None:
    import mlflow

    uri = f"sqlite:///{study / 'results' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sar3d-tests")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage", "?"), []).append(run)
    assert len(by_stage.get("pretrain", [])) == 2
    assert len(by_stage.get("finetune", [])) == 9
    assert len(by_stage.get("evaluate", [])) == 9
    for run in by_stage["pretrain"] + by_stage["finetune"] + by_stage["evaluate"]:
        assert run.info.status == "FINISHED"
        assert run.data.metrics, f"run {run.data.tags['job_key']} logged no metrics"
        assert run.data.params, f"run {run.data.tags['job_key']} logged no params"
    sar = next(r for r in by_stage["pretrain"] if r.data.tags.get("method") == "sar")
    history = client.get_metric_history(sar.info.run_id, "train/loss_res")
    assert len(history) == 2  # one point per epoch
    shutil.rmtree(study / ".snakemake" / "locks", ignore_errors=True)


def test_a_killed_fold_reruns_alone_and_resumes(study: Path) -> None:
    """A fold whose fine-tuning is killed mid-training reruns alone, from its checkpoint.

    The fold is first made "never finished" (its model, checkpoint and evaluation
    removed, and the tables a failed study never reached), then its job is
    SIGKILLed after the first epoch's checkpoint. The rerun must plan only that
    fine-tuning and its evaluation (plus the tables), resume from the checkpoint,
    leave the other folds' outputs and MLflow runs untouched, and continue the
    killed job's MLflow run instead of adding one.
    """
    import signal
    import time

    import mlflow

    results = study / "results"
    target = results / "models" / "finetune" / "pancreas" / "sar" / "r1" / "fold1"
    evaluation = results / "eval" / "pancreas" / "sar" / "r1" / "fold1.csv"
    for path in (target / "checkpoint.pt", target / "model.pt", evaluation, evaluation.with_suffix(".json")):
        path.unlink()
    shutil.rmtree(evaluation.with_name("fold1_pred"))
    # as after a first run that failed at this fold: no tables or figures either
    shutil.rmtree(results / "tables")
    shutil.rmtree(results / "figures")
    others = sorted(results.glob("models/finetune/**/model.pt")) + sorted(results.glob("eval/**/*.csv"))
    before = {p: p.stat().st_mtime_ns for p in others}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sar3d-tests")
    runs_before = {r.info.run_id: r.info.end_time for r in client.search_runs([experiment.experiment_id])}

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(study), "--cores", "1",
           str(evaluation.relative_to(study))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (target / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the training job, mid-run
    proc.wait()
    assert (target / "checkpoint.pt").exists(), "the job never reached its first checkpoint"
    assert not (target / "model.pt").exists(), "a killed job must not leave a finished-looking model"

    snakemake(study, "--unlock")  # a SIGKILLed snakemake leaves its lock behind
    jobs = planned_jobs(snakemake(study, "-n"))
    assert jobs.get("finetune") == 1 and jobs.get("evaluate") == 1, jobs
    snakemake(study, "--cores", "2")
    assert (target / "model.pt").exists() and evaluation.exists()
    log = (results / "logs" / "finetune" / "pancreas-sar-r1-fold1.log").read_text()
    assert "resuming from" in log
    for path, mtime in before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    runs_after = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    for run_id, end_time in runs_before.items():
        run = runs_after[run_id]
        if run.data.tags.get("stage") in ("finetune", "evaluate"):
            assert run.info.end_time == end_time, f"run {run.data.tags.get('job_key')} was touched"
    killed_job = [
        r for r in runs_after.values()
        if r.data.tags.get("stage") == "finetune" and r.data.tags.get("task") == "pancreas"
        and r.data.tags.get("init") == "sar" and r.data.tags.get("fold") == "1"
    ]
    # the first study's run, and one run for the rerun: opened before the kill, continued after it
    assert len(killed_job) == 2, [r.info.run_id for r in killed_job]
    assert all(r.info.status == "FINISHED" for r in killed_job)
