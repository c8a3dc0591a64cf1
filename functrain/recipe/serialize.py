"""A validated recipe as plain data, as YAML and as a hash (`diff` of plain recipes: `functrain.hashing`)."""

from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from functrain.hashing import canonical_hash, diff
from functrain.recipe._check import Component
from functrain.recipe._yaml import Dumper
from functrain.recipe.schema import Recipe, config_fields


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data; components become `{_component_: target, **kwargs}`."""
    return plain(recipe)


def plain(value: Any) -> Any:
    """Configs, components, mappings and sequences as plain dicts and lists, recursively."""
    if isinstance(value, Component):
        return {"_component_": value.target, **{k: plain(v) for k, v in value.kwargs.items()}}
    if attrs.has(type(value)):
        return {k: plain(getattr(value, f.name)) for k, f in config_fields(type(value)).items()}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def dump_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; `load_recipe` reads it back equal."""
    head = f"# resolved recipe of run {recipe.name!r}; continue it: functrain resume <this file> --from latest\n"
    body = yaml.dump(
        to_dict(recipe),
        Dumper=Dumper,
        sort_keys=False,
        default_flow_style=None,
        width=100,
        allow_unicode=True,
    )
    return head + body


def recipe_hash(recipe: Recipe) -> str:
    """sha256 hex digest of the canonical JSON (sorted keys) of `to_dict(recipe)`."""
    return canonical_hash(to_dict(recipe))


__all__ = ["diff", "dump_yaml", "plain", "recipe_hash", "to_dict"]
