"""MLflow tracking: one run per job, tagged and parameterised; a retried job reuses its run."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import mlflow
import pytest

from sar3d.config import tracking_uri
from sar3d.tracking import init_tracking, tracked_run


@pytest.fixture
def config(tracked_config: dict[str, Any]) -> dict[str, Any]:
    return tracked_config


def _runs(config: dict[str, Any]) -> list:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    # the jobs' runs, not the study's parent run
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage != 'study'")


def test_run_holds_tags_params_and_metric_history(config: dict[str, Any]) -> None:
    init_tracking(config)
    with tracked_run(config, "finetune", {"task": "pancreas", "init": "sar", "fold": 1}) as run:
        for epoch in range(3):
            run.metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
    (only,) = _runs(config)
    assert only.info.status == "FINISHED"
    assert only.data.tags["stage"] == "finetune"
    assert only.data.tags["task"] == "pancreas" and only.data.tags["fold"] == "1"
    assert only.data.params["pretrain.methods.sar.loss_weights.restoration"] == "10.0"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    history = client.get_metric_history(only.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [round(m.value, 3) for m in history] == [1.0, 0.5, 0.333]


def test_failed_job_is_marked_and_its_retry_reuses_the_run(config: dict[str, Any]) -> None:
    identity = {"method": "sar"}
    with pytest.raises(RuntimeError), tracked_run(config, "pretrain", identity) as run:
        run.metrics({"train/loss_res": 0.5}, step=0)
        raise RuntimeError("killed")
    (failed,) = _runs(config)
    assert failed.info.status == "FAILED"
    with tracked_run(config, "pretrain", identity) as run:
        run.metrics({"train/loss_res": 0.4}, step=1)
    (retried,) = _runs(config)
    assert retried.info.run_id == failed.info.run_id
    assert retried.info.status == "FINISHED"
    # a finished job that runs again (e.g. a config change) gets a new run
    with tracked_run(config, "pretrain", identity):
        pass
    assert len(_runs(config)) == 2


def test_jobs_are_children_of_one_study_run(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    first = init_tracking(config)
    assert init_tracking(config)["parent_run_id"] == first["parent_run_id"]  # a rerun finds it again
    marker = json.loads((Path(config["results_dir"]) / "mlflow" / "experiment.json").read_text())
    parent_id = marker["parent_run_id"]
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SAR3D_RULE", "finetune")
    with tracked_run(config, "finetune", {"task": "pancreas", "init": "sar", "ratio": 0.5, "fold": 1}):
        pass
    (child,) = _runs(config)
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert (tags["rule"], tags["slurm_job_id"], tags["init"], tags["ratio"]) == ("finetune", "4242", "sar", "0.5")
    assert tags["seed"] == str(config["seed"]) and tags["git_commit"] and tags["host"]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    parent = client.get_run(parent_id)
    assert parent.data.tags["stage"] == "study" and parent.data.params["seed"] == str(config["seed"])
    assert parent.info.status == "RUNNING"
    monkeypatch.delenv("SAR3D_RULE")
    with tracked_run(config, "report", {"table": "table2"}):
        pass
    assert client.get_run(parent_id).info.status == "FINISHED"  # the final table closes the study
    report = next(r for r in _runs(config) if r.data.tags["stage"] == "report")
    assert report.data.tags["rule"] == "report"  # outside Snakemake: the stage


N_JOBS, N_STEPS = 8, 12


def _concurrent_job(config: dict[str, Any], worker: int) -> None:
    """One fake job: a run with a metric point per step, as fast as the store takes them."""
    with tracked_run(config, "finetune", {"task": "pancreas", "init": "sar", "fold": worker}) as run:
        for step in range(N_STEPS):
            run.metrics({"train/loss": worker + step / 100, "val/dice": step / N_STEPS}, step=step)
        run.metrics({"final/best_score": float(worker)})


def test_concurrent_jobs_lose_no_run_and_no_metric(config: dict[str, Any]) -> None:
    """8 processes write into one sqlite store at once, like 8 local Snakemake jobs."""
    init_tracking(config)
    # forkserver: fresh processes (no inherited store connections) that import mlflow only once
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sar3d.tracking", "mlflow"])
    jobs = [ctx.Process(target=_concurrent_job, args=(config, worker)) for worker in range(N_JOBS)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0] * N_JOBS
    runs = _runs(config)
    assert sorted(int(r.data.tags["fold"]) for r in runs) == list(range(N_JOBS))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["final/best_score"] == float(run.data.tags["fold"])
        for key in ("train/loss", "val/dice"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(N_STEPS)), (run.data.tags["fold"], key, steps)
