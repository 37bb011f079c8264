"""Kill a real ``sar3d pretrain`` process after its first checkpoint, rerun it, get the uninterrupted weights.

The in-process resume test in test_pretrain.py interrupts at a chosen line; this
one SIGKILLs an OS process at whatever point it has reached once the first
epoch's checkpoint exists, so a half-written file, a lost MLflow run or state
that only lives in memory would all show up as a mismatch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cubeshards import cube_folder, make_config
from sar3d.pretraining.base import PretrainJob
from sar3d.pretraining.run import run_pretrain

EPOCHS = 3
THREADS = 1  # the reference run and the subprocesses must use the same number of threads to match bit for bit


def _config(root: Path, name: str) -> dict[str, Any]:
    config = make_config(root, results=name, epochs=EPOCHS, steps_per_epoch=8, batch_size=4, num_workers=0)
    config["tracking"]["uri"] = f"sqlite:///{root}/{name}.db"
    return config


def _pretrain_command(config_file: Path, dirs: list[Path], out: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "sar3d.cli", "pretrain", "--config", str(config_file), "--method", "sar",
            "--cubes", *map(str, dirs), "--out", str(out), "--checkpoint", str(ckpt)]


def _checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint resumes at, or -1 while there is none (files appear by atomic rename)."""
    if not path.exists():
        return -1
    return int(torch.load(path, weights_only=True, map_location="cpu")["epoch"])


def test_sigkilled_pretrain_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    dirs = [cube_folder(tmp_path / "ct", "ct", 0, 32, 1), cube_folder(tmp_path / "mri", "mri", 1, 32, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}

    # the interrupted job: killed as soon as the first epoch's checkpoint is on disk
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(_config(tmp_path, "killed")))
    out, ckpt = tmp_path / "killed" / "model.pt", tmp_path / "killed" / "checkpoint.pt"
    command = _pretrain_command(config_file, dirs, out, ckpt)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _checkpoint_epoch(ckpt) < 1:
            if proc.poll() is not None:
                pytest.fail(f"pretrain exited ({proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint_epoch(ckpt)
    assert 1 <= killed_at < EPOCHS, "the job finished before it was killed; make its epochs longer"
    assert not out.exists()

    # the rerun continues from that checkpoint and finishes
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _checkpoint_epoch(ckpt) == EPOCHS
    resumed = torch.load(out, weights_only=True)

    # the same job never interrupted (in this process, same thread count)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        reference_out = tmp_path / "whole" / "model.pt"
        whole = PretrainJob("sar", tuple(dirs), reference_out, tmp_path / "whole" / "checkpoint.pt")
        run_pretrain(_config(tmp_path, "whole"), whole)
    finally:
        torch.set_num_threads(threads)
    reference = torch.load(reference_out, weights_only=True)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
