"""sar3d.slurm: which partitions a run asks for, and refusing those the cluster lacks (no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sar3d.config import ConfigError
from sar3d.slurm import check_partitions, requested_partitions


def resource(raw: object) -> SimpleNamespace:
    """What Snakemake keeps of a resource given in a profile or on the command line: its raw text."""
    return SimpleNamespace(raw=raw)


def fake_sinfo(tmp_path: Path, script: str) -> str:
    path = tmp_path / "sinfo"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_partitions_are_read_as_snakemake_evaluates_them() -> None:
    settings = SimpleNamespace(
        default_resources={"slurm_partition": resource("'gpu'"), "mem_mb": resource(2000)},
        overwrite_resources={
            "finetune": {"slurm_partition": resource("main,gpu")},
            "pretrain": {"slurm_partition": resource("'long' if attempt > 1 else 'gpu'")},  # computed: not judged
            "evaluate": {"runtime": resource(30)},
        },
    )
    assert requested_partitions(settings) == {
        "default-resources: slurm_partition": "gpu",
        "set-resources: finetune:slurm_partition": "main,gpu",
    }
    assert requested_partitions(SimpleNamespace(default_resources=None, overwrite_resources={})) == {}


def test_a_missing_partition_is_refused_by_key(tmp_path: Path) -> None:
    sinfo = fake_sinfo(tmp_path, "printf 'main\\ngpu\\n'")
    check_partitions({"default-resources: slurm_partition": "main,gpu"}, sinfo=sinfo)
    with pytest.raises(ConfigError, match=r"^set-resources: finetune:slurm_partition: Slurm partition 'nope' "
                                          r"does not exist on this cluster \(sinfo lists: gpu, main\)"):
        check_partitions({"set-resources: finetune:slurm_partition": "main,nope"}, sinfo=sinfo)


def test_nothing_is_judged_without_a_working_sinfo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_partitions({"default-resources: slurm_partition": "nope"}, sinfo=str(tmp_path / "absent"))
    broken = fake_sinfo(tmp_path, "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1")
    check_partitions({"default-resources: slurm_partition": "nope"}, sinfo=broken)
    assert "cannot check Slurm partitions" in capsys.readouterr().err
