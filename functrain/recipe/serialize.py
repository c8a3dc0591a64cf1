"""A validated recipe as plain data, as YAML and as a hash; differences between plain recipes."""

import math
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from functrain.hashing import canonical_hash
from functrain.recipe._check import MISSING, Component, join
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


def diff(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs; an absent side is `MISSING` ("<absent>")."""
    out: list[tuple[str, Any, Any]] = []
    _diff(old, new, "", out)
    return out


def _diff(old: Any, new: Any, path: str, out: list) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = list(old) + [k for k in new if k not in old]
        for k in keys:
            _diff(old.get(k, MISSING), new.get(k, MISSING), join(path, k), out)
    elif isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else MISSING
            b = new[i] if i < len(new) else MISSING
            _diff(a, b, join(path, i), out)
    elif not _same(old, new):
        out.append((path, old, new))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):  # 1 vs 1.0 vs True: a change in what the recipe says
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
