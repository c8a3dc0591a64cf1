"""From YAML or plain data to a validated `Recipe`: overrides first, then every check.

Every problem found is collected, each as one "dotted.key: what; what is allowed" line,
and raised together in one `RecipeError`.
"""

import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from functrain.errors import RecipeError
from functrain.recipe._check import (
    INT64_MAX,
    TOP,
    Component,
    component,
    join,
    parameters,
    resolve,
    show,
    unknown,
)
from functrain.recipe._yaml import Loader, yaml_problem
from functrain.recipe.schema import Recipe, config_fields, expected, scalar_problem
from functrain.recipe.serialize import plain

#: The largest recipe file read, in bytes, and the longest override value, in characters:
#: a recipe is configuration, and the YAML reader is slow past these.
MAX_RECIPE_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 64 << 10


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; raise `RecipeError` listing every problem."""
    source = os.fspath(path)
    try:
        text = _read(Path(path), source)
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            [f"{TOP}: cannot read the recipe file: {getattr(err, 'strerror', None) or err}"], source
        ) from err
    try:
        data = yaml.load(text, Loader=Loader)  # safe: Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError([yaml_problem(err)], source) from err
    return parse_recipe({} if data is None else data, source=source, overrides=overrides)


def _read(path: Path, source: str) -> str:
    """The file's text, refused by its size (stat first, then at most one byte past the
    limit read, for a file that grows or a pipe) before the YAML reader sees it."""
    size = path.stat().st_size
    if size <= MAX_RECIPE_BYTES:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) <= MAX_RECIPE_BYTES:
            return data.decode("utf-8")
    size_text = size if size > MAX_RECIPE_BYTES else f"more than {MAX_RECIPE_BYTES}"  # a pipe
    raise RecipeError(
        [
            f"{TOP}: the recipe file is {size_text} bytes; a recipe may hold at most "
            f"{MAX_RECIPE_BYTES} bytes (1 MiB): it is configuration, so keep data in the "
            "files it names"
        ],
        source,
    )


def parse_recipe(
    data: Mapping, *, source: str = "<recipe>", overrides: Sequence[str] = ()
) -> Recipe:
    """Validate a recipe given as plain data (as YAML gives it), after applying `overrides`."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    problems: list[str] = []
    if not isinstance(data, Mapping):
        problems.append(f"{TOP}: got {show(data)}; expected a mapping of recipe keys")
        problems += [
            f"{o}: cannot apply an override to a recipe that is not a mapping" for o in overrides
        ]
        raise RecipeError(problems, source)
    try:
        raw = _copy(data)
        for text in overrides:
            _override(raw, text, problems)
        recipe = _section(Recipe, raw, "", problems)
    except RecursionError:
        problems.append(f"{TOP}: the recipe nests too deeply or refers to itself")
    else:
        problems += [] if recipe is None else _count_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _count_problems(recipe: Recipe) -> list[str]:
    """Limits across fields: what the state counts must fit its int64 counters."""
    samples = recipe.steps * recipe.data.batch_size
    if samples <= INT64_MAX:
        return []
    return [
        f"steps: {recipe.steps} steps of data.batch_size {recipe.data.batch_size} samples are "
        f"{samples} samples, more than the data cursor (int64) counts: at most "
        f"{INT64_MAX // recipe.data.batch_size} steps at this batch size"
    ]


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------- overrides


def _override(raw: dict, text: str, problems: list[str]) -> None:
    """Apply one `dotted.key=value`; the value is YAML, so `optim.lr=1e-3` is a float."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        problems.append(
            f"{text}: malformed override; expected dotted.key=value, e.g. optim.lr=1e-3"
        )
        return
    if len(value_text) > MAX_OVERRIDE_CHARS:
        problems.append(
            f"{key}: the override value is {len(value_text)} characters, over the limit of "
            f"{MAX_OVERRIDE_CHARS} (64 KiB); put a larger value in the recipe file"
        )
        return
    try:
        value = yaml.load(value_text, Loader=Loader)  # safe: Loader is a SafeLoader
    except yaml.YAMLError as err:
        shown = value_text if len(value_text) <= 60 else value_text[:57] + "..."
        problems.append(f"{key}: cannot read the value {shown!r}: {yaml_problem(err)}")
        return
    set_path(raw, key, value, Recipe, problems)


def set_path(raw: dict, key: str, value: Any, schema: type, problems: list[str]) -> None:
    """Set `value` at dotted `key` in `raw`, refusing keys that neither `schema` (an attrs
    config class) nor the component at that path accepts; list items go by index."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        here, last = ".".join(parts[: i + 1]), i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                problems.append(
                    f"{here}: no such index; {'.'.join(parts[:i])} has {len(node)} items"
                )
                return
            part, schema = int(part), None
        elif isinstance(node, dict):
            error = _check_key(node, part, schema, here, last)
            if error:
                problems.append(error)
                return
            schema = _child_schema(schema, part, node)
            if not last and part not in node:
                node[part] = {}  # an absent config section
        else:
            problems.append(f"{here}: {'.'.join(parts[:i])} is {show(node)}, which has no keys")
            return
        if last:
            node[part] = value
        else:
            node = node[part]


def _check_key(node: dict, key: str, schema: Any, path: str, last: bool) -> str | None:
    absent = f"{path}: not set in the recipe; override the whole value, e.g. {path}={{...}}"
    if "_component_" in node:
        if key in node:
            return None
        if not last:
            return absent
        target = node["_component_"]
        fn, error = resolve(target) if isinstance(target, str) else (None, "")
        params = None if error is not None else parameters(fn)
        if params is None or params[1] or key in params[0]:
            return None  # accepted, or a target validation will report anyway
        return unknown(path, key, params[0], f"parameter of {target}")
    if schema is not None:
        fields = config_fields(schema)
        if key not in fields:
            return unknown(path, key, fields, "key")
        return None if last or key in node or attrs.has(fields[key].type) else absent
    return None if key in node else unknown(path, key, node, "key")


def _child_schema(schema: Any, key: str, node: dict) -> Any:
    if schema is None or "_component_" in node:
        return None
    t = config_fields(schema)[key].type
    return t if attrs.has(t) else None


# ---------------------------------------------------------------------------- validation


def _section(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Validate `raw` as the attrs config `cls`; return it, or None after adding problems."""
    if not isinstance(raw, Mapping):
        problems.append(f"{path or TOP}: got {show(raw)}; expected a mapping")
        return None
    fields = config_fields(cls)
    before = len(problems)
    for key in raw:
        if key not in fields:
            problems.append(unknown(join(path, key), key, fields, "key"))
    values: dict[str, Any] = {}
    for key, f in fields.items():
        name, p = f.name, join(path, key)
        if key in raw:
            value = raw[key]
        elif f.default is not attrs.NOTHING and f.type is Component:
            value = plain(f.default.factory())  # validated too, so fill-ins show in the result
        elif f.default is not attrs.NOTHING:
            continue
        else:
            problems.append(f"{p}: missing; required: {expected(f)}")
            continue
        values[name] = _field_value(value, f, p, values, problems)
    return cls(**values) if len(problems) == before else None


def _field_value(
    raw: Any, f: attrs.Attribute, path: str, siblings: dict, problems: list[str]
) -> Any:
    if f.type is Component:
        fill = {
            k: siblings[v]
            for k, v in f.metadata.get("fill", {}).items()
            if siblings.get(v) is not None
        }
        return component(
            _filled(raw, fill), path, problems, provided=set(f.metadata.get("fill", ()))
        )
    if typing.get_origin(f.type) is list and typing.get_args(f.type) == (str,):
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            problems.append(f"{path}: got {show(raw)}; expected {expected(f)}")
            return None
        return list(raw)
    if typing.get_origin(f.type) is list:
        if not isinstance(raw, list) or not (raw or f.metadata.get("empty")):
            problems.append(f"{path}: got {show(raw)}; expected {expected(f)}")
            return None
        return [component(item, f"{path}.{i}", problems) for i, item in enumerate(raw)]
    if attrs.has(f.type):
        if isinstance(raw, bool) and "enabled" in config_fields(f.type):
            raw = {"enabled": raw}  # `compile: true` is short for `compile: {enabled: true}`
        return _section(f.type, raw, path, problems)
    if raw is False and "false_is" in f.metadata:  # `determinism: off`, read by YAML as false
        raw = f.metadata["false_is"]
    problem = scalar_problem(raw, f, path)
    if problem:
        problems.append(problem)
        return None  # so that no sibling is filled from a bad value
    return raw


def _filled(raw: Any, fill: dict[str, Any]) -> Any:
    """`raw` with each `fill` parameter added when its target accepts it by name and lacks it."""
    if not fill or not isinstance(raw, Mapping) or not isinstance(raw.get("_component_"), str):
        return raw
    fn, error = resolve(raw["_component_"])
    params = parameters(fn) if not error else None
    if params is None:
        return raw
    named, _ = params
    return {**raw, **{k: v for k, v in fill.items() if k in named and k not in raw}}
