"""Shared fixtures: a tiny study config that runs end to end in about a minute on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tinystudy import tiny_study


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict[str, Any]:
    return tiny_study(tmp_path / "results")


@pytest.fixture
def tiny_config_file(tmp_path: Path, tiny_config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config, sort_keys=False))
    return path
