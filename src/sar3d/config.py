"""Study configuration: load, validate against the schema, fill defaults, cross-check.

The same schema file backs Snakemake's ``validate`` in the Snakefile and every
``sar3d`` command, so a bad key fails identically with or without Snakemake.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from sar3d.schema import ConfigError, fill_defaults, key_path

__all__ = [
    "ConfigError", "deep_merge", "drop_removed", "flatten", "load_config", "resources_for", "tracking_uri",
    "validate_config",
]

# Catalogues an overlay config can remove an inherited entry from by setting it to null
# (`tasks: {pancreas: null}`): Snakemake merges `--configfile` overlays key by key, so
# without this an overlay could add a task or method but never leave one out.
REMOVABLE = (("datasets",), ("tasks",), ("pretrain", "datasets"), ("pretrain", "methods"))


def schema_path() -> Path:
    """Location of the packaged JSON schema (``workflow/schemas`` links to it)."""
    return Path(str(resources.files("sar3d") / "resources" / "config.schema.yaml"))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text())


def drop_removed(config: dict[str, Any]) -> dict[str, Any]:
    """Delete, in place, the null entries of the :data:`REMOVABLE` catalogues; returns ``config``."""
    for keys in REMOVABLE:
        node: Any = config
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            for name in [k for k, v in node.items() if v is None]:
                del node[name]
    return config


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Drop removed entries, validate against the schema, fill defaults and cross-check; returns a new dict."""
    config = drop_removed(copy.deepcopy(config))
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"config key '{key_path(e)}': {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    fill_defaults(config, schema, schema)
    _cross_check(config)
    return config


def _cross_check(config: dict[str, Any]) -> None:
    if urlsplit(config["tracking"]["uri"] or "").username is not None:
        # the resolved config is logged as MLflow parameters and copied into results/
        raise ConfigError(
            "config key 'tracking.uri': holds credentials; give them in the environment instead "
            "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), never in the config"
        )
    datasets = config["datasets"]
    for name in config["pretrain"]["datasets"]:
        if name not in datasets:
            raise ConfigError(f"config key 'pretrain.datasets.{name}': no dataset '{name}' in 'datasets'")
    for task, spec in config["tasks"].items():
        if spec["dataset"] not in datasets:
            raise ConfigError(f"config key 'tasks.{task}.dataset': no dataset '{spec['dataset']}' in 'datasets'")
        for cls, values in spec["classes"].items():
            missing = sorted(set(values) - set(spec["labels"]))
            if missing:
                raise ConfigError(f"config key 'tasks.{task}.classes.{cls}': values {missing} not in 'labels'")
        if spec["split"]["kind"] == "kfold" and spec["split"]["n"] < 2:
            raise ConfigError(f"config key 'tasks.{task}.split.n': k-fold needs at least 2 folds")
        buckets = spec.get("size_buckets_mm3")
        if buckets == "auto" and spec["split"]["kind"] == "kfold":
            raise ConfigError(
                f"config key 'tasks.{task}.size_buckets_mm3': 'auto' takes the tertiles of the cases that are "
                "never test cases, and k-fold tests every case; give two thresholds"
            )
        if isinstance(buckets, list) and not buckets[0] < buckets[1]:
            raise ConfigError(f"config key 'tasks.{task}.size_buckets_mm3': thresholds must increase, got {buckets}")
    # the method blocks are checked by their kinds (imported here: torch is slow to import)
    from sar3d.pretraining.registry import SCRATCH, validate_blocks

    validate_blocks(config)
    init_lists = [("finetune", key) for key in ("inits", "full_label_inits", "ablation_inits")] + [("probe", "inits")]
    for section, key in init_lists:
        for init in config[section][key]:
            if init != SCRATCH and init not in config["pretrain"]["methods"]:
                raise ConfigError(
                    f"config key '{section}.{key}': '{init}' is neither 'scratch' nor in 'pretrain.methods'"
                )
    if 1 not in config["finetune"]["label_ratios"]:
        raise ConfigError(
            "config key 'finetune.label_ratios': must contain 1 (Tables 2 and 3 and the figures use all labels)"
        )
    for ratio in config["report"]["loss_curve_ratios"]:
        if ratio not in config["finetune"]["label_ratios"]:
            raise ConfigError(f"config key 'report.loss_curve_ratios': {ratio} is not in 'finetune.label_ratios'")
    reference = config["report"]["reference"]
    if config["finetune"]["ablation_inits"] and reference not in config["finetune"]["inits"]:
        raise ConfigError(
            f"config key 'report.reference': Table 3 compares 'finetune.ablation_inits' with '{reference}', "
            "which must be in 'finetune.inits'"
        )
    lower, upper = config["preprocess"]["minmax_percentiles"]
    if lower >= upper:
        raise ConfigError("config key 'preprocess.minmax_percentiles': the lower percentile must be below the upper")
    cubes = config["cubes"]
    if len(cubes["scales"]) != len(cubes["ratio"]):
        raise ConfigError("config key 'cubes.ratio': needs one entry per entry of 'cubes.scales'")
    for name in cubes["per_volume_by_dataset"]:
        if name not in datasets:
            raise ConfigError(f"config key 'cubes.per_volume_by_dataset.{name}': no dataset '{name}' in 'datasets'")


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML study config safely, apply ``overrides`` (deep merge), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if overrides:
        raw = deep_merge(raw, overrides)
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base`` (``extra`` wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tracking_uri(config: dict[str, Any]) -> str:
    """The MLflow tracking URI of a study (the local sqlite store by default)."""
    uri = config["tracking"]["uri"]
    if uri:
        return uri
    db = Path(config["results_dir"]).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def resources_for(config: dict[str, Any], group: str) -> dict[str, int]:
    """Resources of a rule group: schema defaults of that group, then the user's keys."""
    schema_default = load_schema()["properties"]["resources"]["properties"][group]["default"]
    return {**schema_default, **config["resources"].get(group, {})}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted keys, e.g. for MLflow parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out
