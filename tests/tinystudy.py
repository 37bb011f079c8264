"""A tiny study config that runs end to end in a few minutes on CPU, and helpers to run and inspect it."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_study(results_dir: Path) -> dict[str, Any]:
    """The default study shrunk: fewer/smaller cases, a narrow U-Net, a few steps."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["results_dir"] = str(results_dir)
    config["tracking"] = {"uri": None, "experiment": "sar3d-tests"}
    # one CT and one MRI pre-training dataset are enough to exercise every SAR term
    for name in ("lits", "heart"):
        del config["datasets"][name]
        del config["pretrain"]["datasets"][name]
    n_cases = {"luna16": 2, "brats": 6, "pancreas": 4}
    for name, n in n_cases.items():
        config["datasets"][name]["n_cases"] = n
    config["preprocess"]["spacing"] = [2.0, 2.0, 2.0]
    config["cubes"].update(size=[32, 32, 16], per_volume=4)
    # scratch vs SAR, and one single-scale ablation so Table 3 is in the run; label ratio 1 only
    config["pretrain"].update(width=0.125, batch_size=4, epochs=2, steps_per_epoch=2, val_steps=1,
                              methods={k: config["pretrain"]["methods"][k] for k in ("sar", "sar_s2")})
    config["tasks"]["brain_tumour"]["split"]["n"] = 1
    config["tasks"]["pancreas"]["split"]["n"] = 2
    config["finetune"].update(patch_size=[32, 32, 16], epochs=2, steps_per_epoch=2, batch_size=2,
                              inits=["scratch", "sar"], full_label_inits=[], ablation_inits=["sar_s2"],
                              label_ratios=[1])
    config["probe"] = {"inits": ["scratch", "sar"], "steps": 10}  # the random-init floor and SAR's features
    # small enough for a laptop or the 2-CPU CI Slurm node (sbatch refuses what no node has)
    config["resources"] = {
        group: {"threads": 1, "mem_mb": 3000, "runtime": 30} for group in ("pretrain", "finetune", "evaluate")
    }
    return config


def fresh_checkout(dest: Path) -> Path:
    """The repository's files as a fresh clone has them, copied to ``dest`` (links kept as links).

    Tracked files plus new ones git does not ignore, so uncommitted work is tested too;
    nothing ignored (.venv, results/, .snakemake/) comes along.
    """
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, names):
        source, target = REPO / name, dest / name
        if not os.path.lexists(source):  # deleted in the work tree, not yet committed
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def unit_config(store: Path, experiment: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The default study validated with ``overrides``, its results and MLflow store under ``store``."""
    from sar3d.config import load_config

    base = {
        "results_dir": str(store / "results"),
        "tracking": {"uri": f"sqlite:///{store}/mlflow.db", "experiment": experiment},
    }
    return load_config(REPO / "config.yaml", {**base, **overrides})


# --------------------------------------------------------------------------- running the tiny study


def workflow_args(workdir: Path, *args: str) -> list[str]:
    """Snakemake arguments that run this repository's workflow in ``workdir``."""
    return ["-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *workflow_args(workdir, *args)]


def local_env() -> dict[str, str]:
    """This Python's bin dir first on PATH, so jobs run the same `sar3d` and snakemake."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def failure_report(workdir: Path, output: str) -> str:
    """Snakemake's output and the tail of every job log: what a failed run assertion shows."""
    logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in workdir.glob("results/logs/*/*.log"))
    return f"{output[-6000:]}\n{logs[-12000:]}"


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        snakemake_cmd(workdir, *args), capture_output=True, text=True, env=env or local_env(), check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{failure_report(workdir, proc.stderr)}")
    return proc


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts per rule from a dry run's job stats table (its stdout)."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def mlflow_runs(study: Path, experiment: str = "sar3d-tests") -> list[Any]:
    """Every MLflow run of a study in ``study`` (by default the tiny study's experiment)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{study / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id], max_results=5000)


# --------------------------------------------------------------------------- one fold killed mid-training


@dataclass
class UnfinishedFold:
    """A study in which one fold (pancreas, SAR init, ratio 1, fold 1) never finished.

    As after a first run (with ``--keep-going``) that failed at this fold: its
    model, checkpoint and evaluation are missing, and so are the tables and the
    figure that need it; what does not need it (Table 3, the brain figures) exists.
    Snakemake would not rerun a missing intermediate file for targets that exist.
    """

    study: Path
    model_dir: Path
    evaluation: Path
    log: Path
    others: dict[Path, int] = field(default_factory=dict)  # every other fold's outputs -> mtime
    runs: dict[str, int] = field(default_factory=dict)  # MLflow run id -> end time

    @classmethod
    def make(cls, study: Path) -> UnfinishedFold:
        results = study / "results"
        fold = cls(
            study=study,
            model_dir=results / "models" / "finetune" / "pancreas" / "sar" / "r1" / "fold1",
            evaluation=results / "eval" / "pancreas" / "sar" / "r1" / "fold1.csv",
            log=results / "logs" / "finetune" / "pancreas-sar-r1-fold1.log",
        )
        for path in (fold.checkpoint, fold.model, fold.evaluation, fold.evaluation.with_suffix(".json")):
            path.unlink()
        shutil.rmtree(fold.evaluation.with_name("fold1_pred"))
        for pattern in ("tables/table2.*", "tables/table2_hd95.*", "tables/table4.*",
                        "figures/table4_label_ratios.*", "figures/loss_curves_pancreas_r1.*"):
            for path in results.glob(pattern):
                path.unlink()
        others = sorted(results.glob("models/finetune/**/model.pt")) + sorted(results.glob("eval/**/*.csv"))
        fold.others = {p: p.stat().st_mtime_ns for p in others}
        fold.runs = {r.info.run_id: r.info.end_time for r in mlflow_runs(study)}
        return fold

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def target(self) -> str:
        """The evaluation, as a Snakemake target relative to the study."""
        return str(self.evaluation.relative_to(self.study))

    def wait_for_checkpoint(self, proc: subprocess.Popen[Any], timeout: float = 300) -> None:
        """Until the fine-tuning job has written its first epoch's checkpoint (or ``proc`` ended)."""
        deadline = time.monotonic() + timeout
        while not self.checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert self.checkpoint.exists(), "the job never reached its first checkpoint"

    def check_killed(self) -> None:
        assert self.checkpoint.exists(), "the killed job's checkpoint is gone"
        assert not self.model.exists(), "a killed job must not leave a finished-looking model"

    def check_rerun(self) -> None:
        """The rerun resumed the fold from its checkpoint and touched nothing else."""
        assert self.model.exists() and self.evaluation.exists()
        assert "resuming from" in self.log.read_text()
        for path, mtime in self.others.items():
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
        after = {r.info.run_id: r for r in mlflow_runs(self.study)}
        for run_id, end_time in self.runs.items():
            run = after[run_id]
            if run.data.tags.get("stage") in ("finetune", "evaluate"):
                assert run.info.end_time == end_time, f"run {run.data.tags.get('job_key')} was touched"
        killed_job = [r for r in after.values() if self.is_fold_run(r)]
        before = [run_id for run_id in self.runs if self.is_fold_run(after[run_id])]
        # the runs it had, and one for the rerun: opened before the kill, continued after it
        assert len(killed_job) == len(before) + 1, [r.info.run_id for r in killed_job]
        assert all(r.info.status == "FINISHED" for r in killed_job)

    @staticmethod
    def is_fold_run(run: Any) -> bool:
        """An MLflow run of this fold's fine-tuning."""
        tags = run.data.tags
        return (tags.get("stage"), tags.get("task"), tags.get("init"), tags.get("fold")) == (
            "finetune", "pancreas", "sar", "1"
        ) and float(tags.get("ratio", "nan")) == 1.0
