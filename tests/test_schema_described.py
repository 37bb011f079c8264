"""Every key a user can write in a study config carries a description.

Covers the config schema (``workflow/schemas/config.schema.yaml``, a link to the
packaged ``sar3d/resources/config.schema.yaml``) and the block schema of every
built-in pre-training kind as :func:`sar3d.pretraining.registry.block_schema`
assembles it (the common keys plus the kind's own).
"""

from __future__ import annotations

import copy
from typing import Any

from sar3d.config import load_schema
from sar3d.pretraining import registry

# subschemas whose properties are keys a config may hold; `if`/`then`/`not` only constrain them
BRANCHES = ("oneOf", "anyOf", "allOf")
DEFINITIONS = ("$defs", "definitions")


def undescribed(schema: Any, path: str = "") -> list[str]:
    """Dotted keys under ``schema`` whose property schema has no non-empty ``description``.

    ``*`` stands for any key of a mapping (``additionalProperties``), ``[]`` for an
    array's items; definitions are walked under ``$defs.<name>``.
    """
    if not isinstance(schema, dict):
        return []
    out: list[str] = []

    def sub(name: str) -> str:
        return f"{path}.{name}" if path else name

    for name, prop in (schema.get("properties") or {}).items():
        key = sub(name)
        description = prop.get("description") if isinstance(prop, dict) else None
        if not (isinstance(description, str) and description.strip()):
            out.append(key)
        out.extend(undescribed(prop, key))
    for pattern, prop in (schema.get("patternProperties") or {}).items():
        out.extend(undescribed(prop, sub(f"/{pattern}/")))
    out.extend(undescribed(schema.get("additionalProperties"), sub("*")))
    items = schema.get("items")
    for item in (items if isinstance(items, list) else [items]) + list(schema.get("prefixItems") or []):
        out.extend(undescribed(item, f"{path}[]"))
    for keyword in BRANCHES:
        for branch in schema.get(keyword) or []:
            out.extend(undescribed(branch, path))
    for keyword in DEFINITIONS:
        for name, definition in (schema.get(keyword) or {}).items():
            out.extend(undescribed(definition, f"{keyword}.{name}"))
    return sorted(dict.fromkeys(out))


def built_in_kinds() -> dict[str, type]:
    """The registered kinds of :data:`registry.METHOD_MODULES` (not toy kinds other tests register)."""
    return {k: cls for k, cls in registry.kinds().items() if cls.__module__ in registry.METHOD_MODULES}


def test_every_config_key_is_described() -> None:
    missing = undescribed(load_schema())
    assert not missing, "config schema keys without a description:\n  " + "\n  ".join(missing)


def test_every_method_block_key_is_described() -> None:
    kinds = built_in_kinds()
    assert len(kinds) == len(registry.METHOD_MODULES)
    missing = [
        key for kind, cls in kinds.items()
        for key in undescribed(registry.block_schema(cls), f"pretrain.methods.<{kind}>")
    ]
    assert not missing, "method block keys without a description:\n  " + "\n  ".join(missing)


def test_the_walk_reaches_every_kind_of_key() -> None:
    """Nested, mapping, definition, branch and method keys are all looked at, so a removed description fails."""
    schema = load_schema()
    nested = copy.deepcopy(schema)
    tasks = nested["properties"]["tasks"]["additionalProperties"]["properties"]
    del tasks["split"]["properties"]["fixed_test"]["description"]
    nested["properties"]["tracking"]["properties"]["experiment"]["description"] = "  "
    del nested["$defs"]["plateau"]["properties"]["factor"]["description"]
    nested["properties"]["pretrain"]["properties"]["datasets"]["additionalProperties"]["properties"]["channels"][
        "items"] = {"type": "object", "properties": {"x": {"type": "integer"}}}
    tasks["size_buckets_mm3"]["oneOf"].append({"type": "object", "properties": {"y": {"type": "number"}}})
    assert undescribed(nested) == sorted([
        "$defs.plateau.factor", "pretrain.datasets.*.channels[].x", "tasks.*.size_buckets_mm3.y",
        "tasks.*.split.fixed_test", "tracking.experiment",
    ])
    sar = registry.block_schema(registry.kinds()["sar"])
    sar = copy.deepcopy(sar)
    del sar["properties"]["lr"]["properties"]["scale_head"]["description"]
    del sar["properties"]["optimizer"]["properties"]["momentum"]["description"]
    assert undescribed(sar, "pretrain.methods.<sar>") == [
        "pretrain.methods.<sar>.lr.scale_head", "pretrain.methods.<sar>.optimizer.momentum",
    ]
