"""Snakemake on a real (single-node, localhost) Slurm cluster through profiles/slurm.

The cluster comes from tests/slurm/start_slurm.sh (needs root; installs slurm-wlm and munge with
apt-get when missing). Outside CI the test skips when that is impossible; with CI set it fails.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from slurm import fixtures as slurm_fixtures

from tinystudy import REPO, planned_jobs, workflow_args

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


def test_slurm_dry_run_of_the_default_study_shows_every_job_with_its_resources(tmp_path: Path) -> None:
    """`snakemake --profile profiles/slurm -n` (no cluster needed): what each job would ask sbatch for."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    proc = slurm_fixtures.run_snakemake(
        workflow_args(tmp_path, "--profile", str(slurm_fixtures.PROFILE), "-n"), tmp_path,
        slurm_fixtures.cluster_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    blocks = re.findall(r"^rule (\w+):\n(.*?)(?=^\[|\Z)", proc.stdout, flags=re.M | re.S)
    planned = planned_jobs(proc.stdout)
    assert len(blocks) == sum(planned.values()) > 100
    for rule, body in blocks:
        if rule == "all":  # a local rule: collects the targets, never submitted
            continue
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", body).group(1)))
        assert resources["slurm_partition"] == "main", (rule, resources)
        assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0, (rule, resources)
        assert (resources.get("gpu") == "1") == (rule in ("pretrain", "finetune", "evaluate")), (rule, resources)
