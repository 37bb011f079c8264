"""JSON-schema helpers shared by the study config and the pre-training method blocks, and the config error."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jsonschema

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def resolve_ref(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return merged


def fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    schema = resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return
    props: dict[str, Any] = schema.get("properties", {})
    for name, sub in props.items():
        sub = resolve_ref(sub, root)
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            fill_defaults(instance[name], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in instance.items():
            if name not in props:
                fill_defaults(value, extra, root)


def dataclass_from(cls: type[T], section: Mapping[str, Any], key: str, tuples: Sequence[str] = ()) -> T:
    """``cls(**section)``: missing fields keep their defaults, an unknown key is a :class:`ConfigError`.

    Why: a typo must not silently fall back to a default, and YAML gives lists where a
    frozen settings dataclass holds tuples.

    Args:
        cls: a dataclass whose fields are the section's keys.
        section: the config section (e.g. ``pretrain.transforms`` or a method block's sub-mapping).
        key: the section's dotted config key, named in the error.
        tuples: fields whose list values become tuples.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"config key '{key}': unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: tuple(section[k]) if k in tuples else section[k] for k in names if k in section})
