"""Check the Slurm partitions a run asks for before any job is submitted.

Without this check a misspelt partition surfaces as one sbatch error per job, deep
in the executor's output, and never says where the value came from. The workflow
(``workflow/rules/common.smk``) calls :func:`check_partitions` while it is parsed,
so ``snakemake --profile slurm -n`` already names the profile key to fix.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from sar3d.config import ConfigError

PARTITION = "slurm_partition"
WHERE = "the profile (slurm/config.yaml, a link to profiles/slurm/config.yaml) or on the command line"


def _literal(raw: Any) -> str | None:
    """A resource's value as Snakemake evaluates a plain CLI/profile string (``gpu``, ``'gpu'``, ``a,b``).

    None for anything computed (an expression of ``attempt``...): only Slurm can judge that one.
    """
    if not isinstance(raw, str):
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return value if isinstance(value, str) and re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value) else None


def requested_partitions(resource_settings: Any) -> dict[str, str]:
    """Every partition a run asks for, keyed by where it is set (the profile/CLI key).

    Args:
        resource_settings: Snakemake's ``workflow.resource_settings``; its
            ``default_resources`` and ``overwrite_resources`` hold
            ``Resource`` objects whose ``raw`` is the string the user wrote.
    """
    found: dict[str, str] = {}
    defaults = resource_settings.default_resources or {}
    if PARTITION in defaults and (value := _literal(defaults[PARTITION].raw)):
        found[f"default-resources: {PARTITION}"] = value
    for rule, resources in (resource_settings.overwrite_resources or {}).items():
        if PARTITION in resources and (value := _literal(resources[PARTITION].raw)):
            found[f"set-resources: {rule}:{PARTITION}"] = value
    return found


def cluster_partitions(sinfo: str = "sinfo") -> set[str] | None:
    """Partition names the cluster knows, or None where ``sinfo`` is missing or cannot reach it."""
    if shutil.which(sinfo) is None:
        return None
    try:
        proc = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        print(f"sar3d: cannot check Slurm partitions, `sinfo` failed: {proc.stderr.strip()}", file=sys.stderr)
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def check_partitions(requested: Mapping[str, str], sinfo: str = "sinfo") -> None:
    """Refuse a partition the cluster does not have, naming the key that set it.

    Nothing is checked where no partition is requested (the cluster's default one
    is used) or where ``sinfo`` is not available (a dry run on a laptop).

    Args:
        requested: key -> partition, from :func:`requested_partitions`.
        sinfo: the ``sinfo`` command to ask.
    """
    if not requested:
        return
    known = cluster_partitions(sinfo)
    if known is None:
        return
    for key, value in requested.items():
        for partition in value.split(","):  # sbatch -p takes a list: the first that can run the job
            if partition in known:
                continue
            raise ConfigError(
                f"{key}: Slurm partition '{partition}' does not exist on this cluster "
                f"(sinfo lists: {', '.join(sorted(known)) or 'none'}); fix `{key}` in {WHERE}, "
                f"or leave it unset for the cluster's default partition."
            )
