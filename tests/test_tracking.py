"""MLflow tracking: one run per job, tagged and parameterised; a retried job reuses its run."""

from __future__ import annotations

from typing import Any

import mlflow
import pytest

from sar3d.config import tracking_uri, validate_config
from sar3d.tracking import init_tracking, tracked_run


def _runs(config: dict[str, Any]) -> list:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    return client.search_runs([experiment.experiment_id])


def test_run_holds_tags_params_and_metric_history(tiny_config: dict[str, Any]) -> None:
    config = validate_config(tiny_config)
    init_tracking(config)
    with tracked_run(config, "finetune", {"task": "pancreas", "init": "sar", "fold": 1}) as run:
        for epoch in range(3):
            run.metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
    (only,) = _runs(config)
    assert only.info.status == "FINISHED"
    assert only.data.tags["stage"] == "finetune"
    assert only.data.tags["task"] == "pancreas" and only.data.tags["fold"] == "1"
    assert only.data.params["pretrain.loss_weights.restoration"] == "10.0"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(config))
    history = client.get_metric_history(only.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [round(m.value, 3) for m in history] == [1.0, 0.5, 0.333]


def test_failed_job_is_marked_and_its_retry_reuses_the_run(tiny_config: dict[str, Any]) -> None:
    config = validate_config(tiny_config)
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
