"""MLflow tracking shared by every stage.

One experiment per study. The store (a local sqlite file by default, or a tracking
server), the experiment and the study's *parent run* are created once, by the
``tracking_init`` rule, before jobs fan out; their ids go to
``results/mlflow/experiment.json``. Every job then opens a *child* run of that
parent (``mlflow.parentRunId``) tagged with its stage, rule and identity (method /
task / init / fold / ratio), seed, git commit, host and Slurm job id, and logs its
resolved config as parameters. A retried job finds its own unfinished run by
``job_key`` and continues it instead of leaving a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
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
# Compute nodes are often offline, and hundreds of jobs need no usage-telemetry threads.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
log = logging.getLogger(__name__)

STUDY_STAGE = "study"  # ``stage`` tag of the parent run
FINAL_STAGE = "report"  # a finished job of this stage marks the study's parent run FINISHED
# Transient errors of a shared sqlite store under many writers; anything else is raised at once.
_TRANSIENT = ("database is locked", "database table is locked", "database schema has changed", "busy")


def mlflow_module():  # imported lazily: mlflow costs seconds to import
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def _retry(fn, *args, attempts: int = 12, **kwargs):
    """sqlite lets one writer in at a time and refuses others after its busy timeout.

    Back off exponentially (capped) with jitter, so that many jobs finishing together
    do not retry in lockstep; a failed write was rolled back, so repeating it is safe.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            message = str(err).lower()
            if not any(t in message for t in _TRANSIENT) or attempt == attempts - 1:
                raise
            delay = min(0.1 * 2**attempt, 8.0) * (0.5 + random.random())
            log.debug("tracking store busy (%s); retry %d in %.1fs", err, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _common_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """Where and from what code a run was made: the same keys on the parent and every child."""
    return {
        "seed": str(config["seed"]),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
    }


def _study_run(client: Any, experiment_id: str, config: Mapping[str, Any]) -> str:
    """The study's parent run: found by its stage tag, created (with the config as params) once."""
    found = _retry(
        client.search_runs, [experiment_id], filter_string=f"tags.stage = '{STUDY_STAGE}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    if found:
        return found[0].info.run_id
    name = config["tracking"]["experiment"]
    tags = {"stage": STUDY_STAGE, "mlflow.runName": f"study {name}", **_common_tags(config)}
    run_id = _retry(client.create_run, experiment_id, tags=tags).info.run_id
    RunLogger(client, run_id).params(flatten(dict(config)))
    return run_id


def init_tracking(config: Mapping[str, Any]) -> dict[str, str]:
    """Create the store, the study's experiment and its parent run; record their ids.

    Idempotent: a rerun finds the experiment and the parent run again. Run it once
    before jobs fan out (rule ``tracking_init``) so parallel jobs never race to
    create the sqlite schema, the experiment or the parent.
    """
    mlflow = mlflow_module()
    uri = tracking_uri(dict(config))
    results = Path(config["results_dir"]).resolve()
    results.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = config["tracking"]["experiment"]
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A tracking server stores artifacts where it was told to (--default-artifact-root
        # or proxied); a local store keeps them next to the results.
        remote = uri.startswith(("http://", "https://"))
        artifacts = None if remote else (results / "mlflow" / "artifacts").as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    parent = _study_run(client, str(experiment_id), config)
    info = {"tracking_uri": uri, "experiment": name, "experiment_id": str(experiment_id), "parent_run_id": parent}
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
    mlflow = mlflow_module()
    uri = tracking_uri(dict(config))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    marker = fill(TRACKING_READY, config["results_dir"])
    info = read_json(marker) if marker.exists() else init_tracking(config)
    experiment_id = info["experiment_id"]
    parent = info.get("parent_run_id")  # absent in markers written before parent runs existed
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
        "mlflow.runName": job_key.replace("/", " "),
        **_common_tags(config),
        **({"mlflow.parentRunId": parent} if parent else {}),
        **identity,
    }
    tags = {k: str(v) for k, v in tags.items()}
    logger: RunLogger
    if existing:
        run_id = existing[0].info.run_id
        _retry(client.update_run, run_id, status="RUNNING")
        logger = RunLogger(client, run_id)
        # this attempt's host, Slurm job and commit (the run keeps its first params)
        logger.tags({k: tags[k] for k in ("host", "slurm_job_id", "git_commit")})
    else:
        run_id = _retry(client.create_run, experiment_id, tags=tags).info.run_id
        logger = RunLogger(client, run_id)
        logger.params(flatten(dict(params if params is not None else config)))
    if parent:
        _set_status(client, parent, "RUNNING")
    try:
        yield logger
    except BaseException:
        _retry(client.set_terminated, run_id, status="FAILED")
        raise
    _retry(client.set_terminated, run_id, status="FINISHED")
    if parent and stage == FINAL_STAGE:
        _set_status(client, parent, "FINISHED")


def _set_status(client: Any, run_id: str, status: str) -> None:
    """Mark the parent run RUNNING while jobs run and FINISHED after the final table."""
    if _retry(client.get_run, run_id).info.status == status:
        return  # read-only check first: most jobs find the parent already RUNNING
    if status == "RUNNING":
        _retry(client.update_run, run_id, status=status)
    else:
        _retry(client.set_terminated, run_id, status=status)
