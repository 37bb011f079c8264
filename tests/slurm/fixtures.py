"""Reusable pytest helpers for running Snakemake on the local single-node Slurm test cluster.

Use from a test module (not a conftest, so only tests that ask for it pay for it)::

    from slurm import fixtures as slurm_fixtures

    slurm_cluster = slurm_fixtures.slurm_cluster  # re-export the fixture

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        proc = slurm_fixtures.run_snakemake(["--profile", str(slurm_fixtures.PROFILE)], tmp_path, slurm_cluster)

``slurm_cluster`` (session scope) runs ``tests/slurm/start_slurm.sh`` once and yields the
environment to run Snakemake with: ``os.environ`` plus ``PATH`` (this Python's bin dir first, so
jobs find the same snakemake) and ``SAR3D_SLURM_DIR`` / ``SAR3D_SLURM_PROFILE``. It skips the test
when the cluster cannot be set up here (not root, no apt-get, packages not installable, plugin
missing), except when ``CI`` is set: then every setup problem is a failure. The cluster is left
running (cheap, and other xdist workers may be using it); ``tests/slurm/stop_slurm.sh`` stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START = HERE / "start_slurm.sh"
STOP = HERE / "stop_slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
UNAVAILABLE = 77  # start_slurm.sh: cannot be set up on this machine


class SlurmSetupError(RuntimeError):
    """The cluster could not be brought up."""


def cluster_env(slurm_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment for talking to the test cluster and running Snakemake against it."""
    env = dict(os.environ)
    path = [str(Path(sys.executable).parent), *env.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"]
    env["PATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
    env["SAR3D_SLURM_DIR"] = str(slurm_dir or env.get("SAR3D_SLURM_DIR", "/tmp/sar3d-slurm"))
    env["SAR3D_SLURM_PROFILE"] = str(PROFILE)
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


class SlurmUnavailableError(RuntimeError):
    """The cluster cannot be set up on this machine (not root, no apt-get, plugin missing)."""


def start_cluster(timeout: float = 600) -> tuple[dict[str, str], float]:
    """Run start_slurm.sh; return (env, seconds it took).

    Raises :class:`SlurmUnavailableError` when this machine cannot host the cluster and
    :class:`SlurmSetupError` when it should but the setup failed.
    """
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SlurmUnavailableError("the Slurm test cluster needs root (it installs slurm-wlm/munge, starts daemons)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        missing = 'snakemake-executor-plugin-slurm is not installed (pip install -e ".[slurm]")'
        raise SlurmUnavailableError(missing) from None
    env = cluster_env()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(START)], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise SlurmSetupError(f"start_slurm.sh did not finish within {timeout}s") from err
    seconds = time.monotonic() - t0
    if proc.returncode == UNAVAILABLE:
        raise SlurmUnavailableError(f"cannot set up Slurm here: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        raise SlurmSetupError(f"start_slurm.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    env["SAR3D_SLURM_STARTUP_S"] = f"{seconds:.1f}"
    return env, seconds


def cluster_or_reason() -> tuple[dict[str, str] | None, str]:
    """The cluster's env, or None and why it cannot run here. In CI "cannot" is a test failure."""
    try:
        env, seconds = start_cluster()
    except SlurmUnavailableError as err:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm test cluster unavailable in CI: {err}", pytrace=False)
        return None, str(err)
    print(f"Slurm test cluster ready in {seconds:.1f}s (logs in {env['SAR3D_SLURM_DIR']}/log)")
    return env, ""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A running single-node Slurm cluster (partition ``main``, 2 fake GPUs); yields the env dict.

    Skips where the cluster cannot be set up, except in CI (``CI`` set), where that fails.
    """
    env, reason = cluster_or_reason()
    if env is None:
        pytest.skip(reason)
    yield env


def run_snakemake(
    args: Sequence[str], cwd: str | os.PathLike[str], env: dict[str, str], timeout: float = 600,
    *, verbatim: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m snakemake *args`` in ``cwd`` (``verbatim``: ``snakemake *args``, as a user types
    it, found on ``env``'s PATH); on timeout stop it with SIGINT (so it cancels its Slurm jobs),
    then SIGKILL if it does not exit, and raise ``subprocess.TimeoutExpired``."""
    cmd = ["snakemake", *args] if verbatim else [sys.executable, "-m", "snakemake", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # SIGTERM would leave queued/running Slurm jobs behind
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


# squeue --Format fields (`name:|` = no padding, "|" after it); comment last, it may hold a "|".
SQUEUE_FIELDS = {
    "id": "JobID", "name": "Name", "state": "State", "partition": "Partition", "cpus": "NumCPUs", "memory": "MinMemory",
    "time_limit": "TimeLimit", "tres_per_job": "tres-per-job", "tres_per_node": "tres-per-node", "comment": "Comment",
}


def slurm_jobs(env: dict[str, str], job_ids: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Jobs slurmctld still knows (finished ones stay for MinJobAge=3600 s): id -> the SQUEUE_FIELDS.

    ``gres`` is what the job asked for, per job (``--gpus``) or per node (``--gres``).
    """
    fields = list(SQUEUE_FIELDS.values())
    cmd = ["squeue", "-h", "-t", "all", "-O", ",".join(f"{f}:|" for f in fields)]
    if job_ids:
        cmd += ["-j", ",".join(job_ids)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        values = line.removesuffix("|").split("|", len(SQUEUE_FIELDS) - 1)
        job = {k: v.strip() for k, v in zip(SQUEUE_FIELDS, values, strict=True)}
        job["gres"] = next((job[k] for k in ("tres_per_job", "tres_per_node") if job[k] not in ("", "N/A")), "")
        jobs[job["id"]] = job
    return jobs


def submitted_job_ids(env: dict[str, str]) -> set[str]:
    """Every job id slurmctld logged as submitted through sbatch since it started."""
    log = Path(env["SAR3D_SLURM_DIR"]) / "log" / "slurmctld.log"
    ids = set()
    for line in log.read_text(errors="replace").splitlines():
        if "_slurm_rpc_submit_batch_job: JobId=" in line:
            ids.add(line.split("JobId=", 1)[1].split()[0])
    return ids
