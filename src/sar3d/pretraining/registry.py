"""Every pre-training method kind, and what the rest of the study derives from them.

The config's method names (``pretrain.methods`` blocks and their ``kind``), the
names and row order of the tables and figures, which tables a fine-tuned init
belongs to, and each pre-training job's settings all come from here, so a new
method touches its own module, one line of :data:`METHOD_MODULES` and its test.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from sar3d.pretraining.base import MAIN, OPTIMIZERS, TRAINING_KEYS, PretrainMethod
from sar3d.schema import ConfigError, fill_defaults, key_path

# the modules that define (and register) the built-in kinds; a new method adds its line here
METHOD_MODULES = (
    "sar3d.pretraining.methods.genesis",
    "sar3d.pretraining.methods.sar",
    "sar3d.pretraining.methods.rpl",
    "sar3d.pretraining.methods.jigsaw",
    "sar3d.pretraining.methods.rotation",
    "sar3d.pretraining.methods.cpc",
    "sar3d.pretraining.methods.vectorpose",
    "sar3d.pretraining.methods.separeg",
)
SCRATCH = "scratch"  # the init without pre-training

_KINDS: dict[str, type[PretrainMethod]] = {}

# keys every block may carry, whatever its kind
COMMON_BLOCK_SCHEMA: dict[str, Any] = {
    "kind": {"type": "string", "description": "The method (a kind of sar3d.pretraining.registry)."},
    "display": {"type": "string", "description": "Name in tables and figures (default: the kind's)."},
    "optimizer": {
        "type": "object", "additionalProperties": False,
        "description": "The method's own optimiser settings over 'pretrain.optimizer' (e.g. name: adam, lr).",
        "properties": {
            "name": {"type": "string", "enum": list(OPTIMIZERS), "description": "SGD with momentum or Adam."},
            "lr": {"type": "number", "exclusiveMinimum": 0,
                   "description": "Main optimiser learning rate (the U-Net; heads unless the block sets theirs)."},
            "momentum": {"type": "number", "minimum": 0, "description": "SGD momentum."},
        },
    },
}


@dataclass(frozen=True)
class InitInfo:
    """How the tables show one fine-tuning init."""

    display: str
    rank: float
    role: str


def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    """Class decorator: make ``cls.kind`` a method kind (a test may register a toy method the same way)."""
    for attr in ("kind", "display", "rank"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must declare '{attr}' to be registered")
    if cls.artefacts and cls.make_artefact.__func__ is PretrainMethod.make_artefact.__func__:
        raise TypeError(f"{cls.__name__} declares artefacts {cls.artefacts} but does not define make_artefact()")
    known = _KINDS.get(cls.kind)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"pre-training kind '{cls.kind}' is taken by {known.__module__}.{known.__qualname__}")
    _KINDS[cls.kind] = cls
    return cls


def kinds() -> dict[str, type[PretrainMethod]]:
    """Every registered kind, the built-in ones imported on first use."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
    return dict(_KINDS)


def block_schema(cls: type[PretrainMethod]) -> dict[str, Any]:
    """The JSON schema of a block of kind ``cls``: the common keys plus the kind's own."""
    return {
        "type": "object", "additionalProperties": False, "required": ["kind"],
        "properties": {**COMMON_BLOCK_SCHEMA, **cls.block_schema},
    }


def validate_blocks(config: dict[str, Any]) -> None:
    """Check every ``pretrain.methods`` block against its kind and fill its defaults, in place.

    Raises :class:`~sar3d.schema.ConfigError` naming ``pretrain.methods.<name>.<key>``.
    """
    known = kinds()
    errors: list[tuple[str, str]] = []
    for name, block in config["pretrain"]["methods"].items():
        key = f"pretrain.methods.{name}"
        cls = known.get(block.get("kind"))
        if cls is None:
            errors.append((f"{key}.kind", f"unknown kind '{block.get('kind')}' (known: {', '.join(sorted(known))})"))
            continue
        schema = block_schema(cls)
        found = sorted(jsonschema.Draft202012Validator(schema).iter_errors(block), key=lambda e: list(e.path))
        errors.extend((f"{key}.{key_path(e)}" if e.absolute_path else key, e.message) for e in found)
        if not found:
            fill_defaults(block, schema, schema)
            errors.extend(cls.check(name, block, config))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(f"config key '{k}': {m}" for k, m in errors))


def method_class(config: Mapping[str, Any], name: str) -> type[PretrainMethod]:
    """The class of the ``pretrain.methods.<name>`` block."""
    blocks = config["pretrain"]["methods"]
    if name not in blocks:
        raise ConfigError(f"config key 'pretrain.methods': no method '{name}' (configured: {', '.join(blocks)})")
    return kinds()[blocks[name]["kind"]]


def build(config: Mapping[str, Any], name: str, device: Any) -> PretrainMethod:
    """The method of block ``name``, its U-Net and heads built and seeded on ``device``."""
    return method_class(config, name)(name, config, device)


def describe(config: Mapping[str, Any], init: str) -> InitInfo:
    """Display name, row rank and table role of a fine-tuning init (``scratch`` or a method block)."""
    if init == SCRATCH:
        return InitInfo("Scratch", 0.0, MAIN)
    block = config["pretrain"]["methods"][init]
    cls = method_class(config, init)
    return InitInfo(block.get("display") or cls.display_name(block), cls.table_rank(block), cls.role(block))


def display_name(config: Mapping[str, Any], init: str) -> str:
    """The name tables and figures show for a fine-tuning init."""
    return describe(config, init).display


def table_order(config: Mapping[str, Any], inits: list[str]) -> list[str]:
    """``inits`` in the paper's row order (by rank; ties keep the config's order)."""
    return sorted(dict.fromkeys(inits), key=lambda init: describe(config, init).rank)


def job_settings(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What one pre-training job computes from: its block and the shared settings its kind reads.

    Used as the job's rule params and checkpoint fingerprint, so adding or changing
    another method's block reruns nothing of this one.
    """
    cls = method_class(config, name)
    shared = config["pretrain"]
    return {
        "block": copy.deepcopy(config["pretrain"]["methods"][name]),
        "shared": {k: copy.deepcopy(shared[k]) for k in (*TRAINING_KEYS, *cls.shared_keys)},
    }
