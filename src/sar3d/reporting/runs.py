"""The study's finished MLflow runs per fine-tuning job: run ids for the tables, histories for the figures."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sar3d import paths
from sar3d.config import tracking_uri
from sar3d.tracking import mlflow_module

log = logging.getLogger(__name__)

Key = tuple[str, str, str, int]  # task, init, ratio tag, fold


def mlflow_client(config: Mapping[str, Any]) -> Any:
    """A client on the study's tracking store."""
    return mlflow_module().MlflowClient(tracking_uri=tracking_uri(dict(config)))


def stage_runs(config: Mapping[str, Any], stage: str) -> dict[Key, Any]:
    """The latest finished MLflow run of ``stage`` per (task, init, ratio, fold), from the run tags.

    Returns ``{}`` (with a warning) when the store cannot be read: run ids are
    traceability, not numbers, and must not stop a report.
    """
    try:
        client = mlflow_client(config)
        experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
        if experiment is None:
            return {}
        runs, token = [], None
        while True:
            page = client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                max_results=1000, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except Exception as err:  # any store problem only costs the run ids
        log.warning("could not read %s runs from MLflow: %s", stage, err)
        return {}
    out: dict[Key, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.end_time or 0):  # the latest wins
        tags = run.data.tags
        try:
            key = (tags["task"], tags["init"], paths.ratio_tag(float(tags["ratio"])), int(tags["fold"]))
        except (KeyError, ValueError):
            continue
        out[key] = run
    return out
