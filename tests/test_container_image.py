"""containers/Dockerfile built and run for real, and one rule run in it by Snakemake.

The image is built by containers/build-local.sh (what CI does before the tests; run
again here it reuses podman's layer cache, so a current image costs seconds): a
Debian base made locally, the CPU torch wheel, the project installed as users get it.
Snakemake's container support runs the rule through `apptainer exec`, answered by
containers/apptainer-podman because Debian packages no Apptainer (docs/cluster.md).
Needs root; elsewhere the tests skip saying why, except under CI, where that fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinystudy import REPO, failure_report, snakemake_cmd, tiny_study

pytestmark = pytest.mark.container
CONTAINERS = REPO / "containers"
PODMAN = CONTAINERS / "podman-local"


@pytest.fixture(scope="module")
def image() -> str:
    """The locally built image's tag, built (or found current) by containers/build-local.sh."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        reason = "building the image needs root and apt-get (podman, runc, mmdebstrap)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(CONTAINERS / "build-local.sh")], capture_output=True, text=True, env=env, timeout=1800, check=False
    )
    assert proc.returncode == 0, f"containers/build-local.sh failed:\n{proc.stderr[-6000:]}"
    return proc.stdout.strip().splitlines()[-1]


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PODMAN), *args], capture_output=True, text=True, timeout=600, check=False)


def test_image_runs_sar3d_as_its_own_user_with_the_pinned_torch(image: str) -> None:
    default = podman("run", "--rm", image)  # CMD: sar3d --help
    assert default.returncode == 0, default.stderr
    for stage in ("download", "normalise", "pretrain", "finetune", "evaluate", "report"):
        assert re.search(rf"^\s+{stage}\b", default.stdout, re.M), f"`sar3d --help` lacks {stage}:\n{default.stdout}"
    probe = "import torch, monai, mlflow, sar3d; print(torch.__version__, sar3d.__file__)"
    inside = podman("run", "--rm", image, "sh", "-c", f'id -un; command -v sar3d; python -c "{probe}"')
    assert inside.returncode == 0, inside.stderr
    user, sar3d_bin, versions = inside.stdout.split("\n")[:3]
    torch_version, package = versions.split()
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", (CONTAINERS / "Dockerfile").read_text(), re.M).group(1)
    assert user == "sar3d"
    assert sar3d_bin == "/opt/sar3d/bin/sar3d"
    assert torch_version.split("+")[0] == pinned
    assert package.startswith("/opt/sar3d/lib/"), "sar3d must be installed in the image, not mounted"


def test_snakemake_runs_a_rule_inside_the_image(image: str, tmp_path: Path) -> None:
    config = tiny_study(Path("results"))
    config["container"] = f"docker://{image}"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "apptainer").symlink_to(CONTAINERS / "apptainer-podman")
    calls = tmp_path / "apptainer-calls.log"
    # The host's `sar3d` is off PATH: the rules' commands can only succeed inside the image.
    path = os.pathsep.join([str(shim), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    assert shutil.which("sar3d", path=path) is None
    env = {**os.environ, "PATH": path, "SAR3D_APPTAINER_LOG": str(calls)}
    target = "results/raw/luna16"
    # the target first: --software-deployment-method takes several values
    cmd = snakemake_cmd(tmp_path, target, "--cores", "1", "--software-deployment-method", "apptainer")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, failure_report(tmp_path, proc.stderr)

    cases = sorted((tmp_path / target / "imagesTr").glob("*.nii.gz"))
    assert len(cases) == config["datasets"]["luna16"]["n_cases"], cases
    log = calls.read_text()
    # Snakemake fetched the image once, then ran both jobs (tracking_init, download) through it
    assert re.search(rf"pull --name \S+\.simg docker://{re.escape(image)}", log), log
    execs = [line for line in log.splitlines() if " exec " in line]
    assert len(execs) == 2, log
    assert all(".snakemake/singularity/" in line for line in execs), log
    assert any("sar3d\\ download" in line or "sar3d download" in line for line in execs), log
