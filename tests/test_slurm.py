"""Snakemake on a real (single-node, localhost) Slurm cluster through profiles/slurm (`--profile slurm`).

The cluster comes from tests/slurm/start_slurm.sh (needs root; installs slurm-wlm and munge with
apt-get when missing). Outside CI the test skips when that is impossible; with CI set it fails.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from slurm import fixtures as slurm_fixtures
from tinystudy import fresh_checkout, mlflow_runs, planned_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

slurm_cluster = slurm_fixtures.slurm_cluster

SNAKEFILE = r'''
SAMPLES = ["a", "b", "c"]
STAMP = 'host=$(hostname) job=${{SLURM_JOB_ID:-none}}'

rule all:
    input:
        "summary.txt",

rule prepare:
    output:
        "prep/{sample}.txt",
    resources:
        mem_mb=200,
        runtime=5,
    shell:
        'echo "rule=prepare sample={wildcards.sample} ' + STAMP + '" > {output}'

rule train_gpu:
    input:
        expand("prep/{sample}.txt", sample=SAMPLES),
    output:
        "gpu.txt",
    resources:
        gpu=1,
        mem_mb=200,
        runtime=5,
    shell:
        'echo "rule=train_gpu ' + STAMP + '" > {output}'

rule summary:
    input:
        gpu="gpu.txt",
        prep=expand("prep/{sample}.txt", sample=SAMPLES),
    output:
        "summary.txt",
    resources:
        mem_mb=200,
        runtime=5,
    shell:
        'echo "rule=summary ' + STAMP + '" > {output}'
'''

OUTPUTS = {
    "prep/a.txt": "prepare",
    "prep/b.txt": "prepare",
    "prep/c.txt": "prepare",
    "gpu.txt": "train_gpu",
    "summary.txt": "summary",
}


def test_workflow_runs_as_slurm_jobs(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    t0 = time.monotonic()
    proc = slurm_fixtures.run_snakemake(
        [
            "--profile", str(slurm_fixtures.PROFILE),
            # Short jobs on a local cluster: poll often, do not retry, do not wait for NFS.
            "--seconds-between-status-checks", "2",
            "--slurm-init-seconds-before-status-checks", "2",
            "--retries", "0",
            "--latency-wait", "5",
        ],
        tmp_path,
        slurm_cluster,
        timeout=300,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"snakemake failed after {seconds:.0f}s:\n{proc.stdout[-8000:]}"
    print(f"workflow on Slurm: {seconds:.1f}s (cluster start {slurm_cluster.get('SAR3D_SLURM_STARTUP_S')}s)")

    job_ids = {}
    for name, rule in OUTPUTS.items():
        out = tmp_path / name
        assert out.is_file(), f"{name} missing:\n{proc.stdout[-4000:]}"
        text = out.read_text()
        assert f"rule={rule} " in text
        match = re.search(r"job=(\d+)\b", text)
        assert match, f"{name} was not written inside a Slurm job: {text!r}"
        job_ids[name] = match.group(1)
    assert len(set(job_ids.values())) == len(OUTPUTS), f"outputs share Slurm jobs: {job_ids}"

    # Every job went through sbatch, under this run's name, and finished cleanly.
    assert set(job_ids.values()) <= slurm_fixtures.submitted_job_ids(slurm_cluster)
    jobs = slurm_fixtures.slurm_jobs(slurm_cluster, list(job_ids.values()))
    names = {job["name"] for job in jobs.values()}
    assert len(names) == 1, f"expected one Snakemake run name, got {names}"
    for name, job_id in job_ids.items():
        job = jobs[job_id]
        assert job["state"] == "COMPLETED", (name, job)
        assert job["comment"].startswith(f"rule_{OUTPUTS[name]}"), (name, job)
        # the rule's resources reached sbatch: only the GPU rule holds the (fake) GPU
        assert (job["gres"] == "gres:gpu:1") == (OUTPUTS[name] == "train_gpu"), (name, job)
        assert job["memory"] == "200M", (name, job)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository as a fresh clone has it: where a user types `snakemake --profile slurm`."""
    return fresh_checkout(tmp_path_factory.mktemp("clone"))


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run prints."""
    blocks = re.findall(r"^rule (\w+):\n(.*?)(?=^\[|\Z)", output, flags=re.M | re.S)
    return [
        (rule, dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", body).group(1))))
        for rule, body in blocks
    ]


def fake_slurm_commands(bin_dir: Path, partitions: list[str]) -> dict[str, str]:
    """An environment whose `sinfo` lists ``partitions`` (squeue/scontrol answer nothing), no cluster needed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {"sinfo": "printf '%s\\n' " + " ".join(partitions), "squeue": "exit 0", "scontrol": "exit 0"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = slurm_fixtures.cluster_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_verbatim_profile_plans_the_default_study_from_a_fresh_checkout(checkout: Path) -> None:
    """`snakemake --profile slurm -n`, exactly as typed at the root of a fresh clone (no cluster needed)."""
    proc = slurm_fixtures.run_snakemake(
        ["--profile", "slurm", "-n"], checkout, slurm_fixtures.cluster_env(), timeout=300, verbatim=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in proc.stdout
    jobs = job_resources(proc.stdout)
    assert len(jobs) == sum(planned_jobs(proc.stdout).values()) > 100
    for rule, resources in jobs:
        if rule == "all":  # a local rule: collects the targets, never submitted
            continue
        # no partition in the profile: sbatch gets the cluster's default one
        assert "slurm_partition" not in resources, (rule, resources)
        assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0, (rule, resources)
        assert (resources.get("gpu") == "1") == (rule in ("pretrain", "finetune", "evaluate")), (rule, resources)


def test_a_partition_the_cluster_lacks_stops_the_run_naming_the_key(checkout: Path, tmp_path: Path) -> None:
    env = fake_slurm_commands(tmp_path / "bin", ["main", "gpu"])
    proc = slurm_fixtures.run_snakemake(
        ["--profile", "slurm", "-n", "--default-resources", "slurm_partition=nope"], checkout, env, verbatim=True
    )
    assert proc.returncode != 0
    assert "default-resources: slurm_partition: Slurm partition 'nope' does not exist" in proc.stdout, proc.stdout
    assert "sinfo lists: gpu, main" in proc.stdout
    assert "rule pretrain" not in proc.stdout  # stopped before planning any job

    proc = slurm_fixtures.run_snakemake(
        ["--profile", "slurm", "-n", "--set-resources", "finetune:slurm_partition=gpux"], checkout, env,
        verbatim=True,
    )
    assert proc.returncode != 0
    assert "set-resources: finetune:slurm_partition: Slurm partition 'gpux'" in proc.stdout, proc.stdout


def test_an_existing_partition_reaches_the_jobs_it_was_set_for(checkout: Path, tmp_path: Path) -> None:
    env = fake_slurm_commands(tmp_path / "bin", ["main", "gpu"])
    proc = slurm_fixtures.run_snakemake(
        ["--profile", "slurm", "-n", "--set-resources", "finetune:slurm_partition=gpu"], checkout, env,
        verbatim=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    partitions = {(rule, resources.get("slurm_partition")) for rule, resources in job_resources(proc.stdout)}
    assert ("finetune", "gpu") in partitions
    assert all(partition is None for rule, partition in partitions if rule != "finetune"), partitions


def test_verbatim_profile_submits_to_the_clusters_default_partition(
    slurm_cluster: dict[str, str], checkout: Path
) -> None:
    """`snakemake --profile slurm <target>` at the root of a fresh clone, on the test cluster, unchanged."""
    target = "results/raw/luna16"
    proc = slurm_fixtures.run_snakemake(["--profile", "slurm", target], checkout, slurm_cluster, timeout=400,
                                        verbatim=True)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert (checkout / target / "manifest.json").is_file()
    runs = {r.data.tags.get("stage"): r for r in mlflow_runs(checkout, experiment="sar3d-default")}
    job_ids = [runs["download"].data.tags["slurm_job_id"]]
    assert all(job_ids), runs
    assert set(job_ids) <= slurm_fixtures.submitted_job_ids(slurm_cluster)
    for job_id, job in slurm_fixtures.slurm_jobs(slurm_cluster, job_ids).items():
        assert job["state"] == "COMPLETED" and job["partition"] == "main", (job_id, job)


def test_a_partition_the_test_cluster_lacks_is_refused_by_name(
    slurm_cluster: dict[str, str], checkout: Path
) -> None:
    proc = slurm_fixtures.run_snakemake(
        ["--profile", "slurm", "-n", "--default-resources", "slurm_partition=nope"], checkout, slurm_cluster,
        verbatim=True,
    )
    assert proc.returncode != 0
    assert "default-resources: slurm_partition: Slurm partition 'nope' does not exist" in proc.stdout, proc.stdout
    assert "sinfo lists: main" in proc.stdout
