"""MLflow tracking shared by every stage.

The store (a local sqlite file by default) and the study's experiment are created
once, by the ``tracking_init`` rule, before jobs fan out; every job then opens a
run tagged with its stage and identity (method / task / fold / ratio) and logs
its resolved config as parameters. A retried job finds its own unfinished run by
``job_key`` and continues it instead of leaving a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sar3d.config import flatten, tracking_uri
from sar3d.io import read_json, write_json
from sar3d.paths import TRACKING_READY, fill

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
log = logging.getLogger(__name__)


def _mlflow():  # imported lazily: mlflow costs seconds to import
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """sqlite stores refuse concurrent writers now and then; back off and retry."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_tracking(config: Mapping[str, Any]) -> dict[str, str]:
    """Create the store and the study experiment; record both in a marker file."""
    mlflow = _mlflow()
    uri = tracking_uri(dict(config))
    results = Path(config["results_dir"]).resolve()
    results.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    name = config["tracking"]["experiment"]
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifacts = (results / "mlflow" / "artifacts").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    info = {"tracking_uri": uri, "experiment": name, "experiment_id": str(experiment_id)}
    write_json(fill(TRACKING_READY, config["results_dir"]), info)
    return info


class RunLogger:
    """Thin handle on one MLflow run; every call is retried on sqlite lock errors."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        _retry(self.client.log_batch, self.run_id, metrics=batch)

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(batch), 100):
            _retry(self.client.log_batch, self.run_id, params=batch[start : start + 100])

    def tags(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)


@contextlib.contextmanager
def tracked_run(
    config: Mapping[str, Any], stage: str, identity: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> Iterator[RunLogger]:
    """Open (or resume) the MLflow run of one job and close it with its final status.

    ``identity`` holds the job's tags (method, task, fold, ratio...); together with
    the stage they form ``job_key``, which a retried job uses to find its run.
    """
    mlflow = _mlflow()
    uri = tracking_uri(dict(config))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    marker = fill(TRACKING_READY, config["results_dir"])
    info = read_json(marker) if marker.exists() else init_tracking(config)
    experiment_id = info["experiment_id"]
    job_key = "/".join([stage, *(f"{k}={v}" for k, v in sorted(identity.items()))])
    existing = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.job_key = '{job_key}' and attributes.status != 'FINISHED'",
        max_results=1,
    )
    tags = {
        "stage": stage,
        "job_key": job_key,
        "seed": config["seed"],
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "mlflow.runName": job_key.replace("/", " "),
        **identity,
    }
    if existing:
        run_id = existing[0].info.run_id
        _retry(client.update_run, run_id, status="RUNNING")
    else:
        run = _retry(client.create_run, experiment_id, tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
    logger = RunLogger(client, run_id)
    if not existing:
        logger.params(flatten(dict(params if params is not None else config)))
    try:
        yield logger
    except BaseException:
        _retry(client.set_terminated, run_id, status="FAILED")
        raise
    _retry(client.set_terminated, run_id, status="FINISHED")
