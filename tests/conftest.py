"""Shared fixtures: a tiny study config that runs end to end in about a minute on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sar3d.config import validate_config
from tinystudy import tiny_study


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict[str, Any]:
    return tiny_study(tmp_path / "results")


@pytest.fixture
def tiny_config_file(tmp_path: Path, tiny_config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store per test process: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracked_config(tiny_config: dict[str, Any], mlflow_store: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The tiny study, validated, logging into the shared store under an experiment of its own."""
    tracking = {"uri": mlflow_store, "experiment": request.node.nodeid}
    return validate_config({**tiny_config, "tracking": tracking})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store per test module: creating a sqlite store costs seconds."""
    return tmp_path_factory.mktemp("mlflow")
