"""Recipes: YAML -> a validated, frozen config whose parts are `_component_` calls.

    recipe = load_recipe("recipes/lm.yaml", ["optim.lr=1e-3"])
    optimizer = instantiate(recipe.optim)

Validation imports every component's target and checks its kwargs against the signature,
but calls nothing; every problem is collected and reported in one `RecipeError`.
"""

import hashlib
import json
import math
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from functrain._recipe_check import (
    MISSING,
    TOP,
    Component,
    RecipeError,
    component,
    config_fields,
    describe,
    instantiate,
    join,
    parameters,
    resolve,
    set_path,
    show,
    type_ok,
    unknown,
)
from functrain.preempt import SIGNALS

# Defined next door to keep files short; they belong to this module's public API.
Component.__module__ = RecipeError.__module__ = __name__

__all__ = [
    "CheckpointConfig",
    "Component",
    "DataConfig",
    "EvalConfig",
    "Recipe",
    "RecipeError",
    "diff",
    "dump_yaml",
    "instantiate",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "to_dict",
]


# ---------------------------------------------------------------------------- the schema


def _field(
    *, expect: str, check: Callable[[Any], bool] | None = None, key: str | None = None, **kw: Any
) -> Any:
    """A config field: `expect` says what is allowed, `check` tests the value past its type,
    `key` is its recipe key when that is no Python name (see `config_fields`)."""
    metadata = {"expect": expect, "check": check, **({"key": key} if key else {})}
    return attrs.field(metadata=metadata, validator=_on_set, **kw)


def _on_set(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    # Runs only when code builds or evolves a config directly; parse_recipe checks first.
    problem = _scalar_problem(value, attribute, f"{type(inst).__name__}.{attribute.name}")
    if problem:
        raise RecipeError([problem], "<config>")


def _positive(v: Any) -> bool:
    return v is None or v > 0


_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DEVICE = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)\Z")


@attrs.frozen(kw_only=True)
class DataConfig:
    """The `data:` section."""

    dataset: Component
    batch_size: int = _field(expect="an integer > 0 (the global batch size)", check=_positive)
    shuffle: bool = _field(default=True, expect="true or false")
    num_workers: int = _field(default=0, expect="an integer >= 0", check=lambda v: v >= 0)


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """The `checkpoint:` section: snapshot cadence and retention."""

    every: int | None = _field(
        default=None, expect="an integer > 0, or null (only the final snapshot)", check=_positive
    )
    keep_last: int | None = _field(
        default=None, expect="an integer > 0, or null (keep all)", check=_positive
    )
    async_save: bool = _field(
        default=False,
        key="async",
        expect="true or false (true: write snapshots in the background, stalling only for a copy)",
    )
    keep_every: int | None = _field(
        default=None,
        expect="an integer > 0 (keep snapshots whose step is a multiple of it), or null",
        check=_positive,
    )
    on_error: Literal["stop", "continue"] = _field(
        default="stop",
        expect="'stop' (a failed snapshot ends the run, exit 2) or 'continue' (warn, train on)",
    )
    signal: str | None = _field(
        default=None,
        expect=f"null or one of {', '.join(SIGNALS)} (stop cleanly on it, as on SIGTERM)",
        check=lambda v: v in SIGNALS,
    )


@attrs.frozen(kw_only=True)
class EvalConfig:
    """The `eval:` section."""

    every: int | None = _field(
        default=None, expect="an integer > 0, or null (no eval)", check=_positive
    )
    batches: int = _field(default=10, expect="an integer > 0", check=_positive)


@attrs.frozen(kw_only=True)
class Recipe:
    """A validated run recipe. Component fields are checked but not instantiated."""

    name: str = _field(
        expect="a name of letters, digits, '-', '_', '.' (not '.' or '..')",
        check=lambda v: bool(_NAME.match(v)) and v not in (".", ".."),
    )
    out_dir: str = _field(default="runs", expect="a non-empty path", check=bool)
    seed: int = _field(default=0, expect="an integer >= 0", check=lambda v: v >= 0)
    steps: int = _field(expect="an integer > 0 (total optimizer steps)", check=_positive)
    device: str = _field(
        default="auto",
        expect="'auto', 'cpu', 'cuda' or 'cuda:N'",
        check=lambda v: bool(_DEVICE.match(v)),
    )
    parallel: Literal["ddp", "fsdp"] = _field(
        default="ddp",
        expect="'ddp' (under torchrun every rank holds the whole state) or 'fsdp' (params, "
        "gradients and optimizer state sharded over the ranks with FSDP2)",
    )
    model: Component
    loss: Component
    data: DataConfig
    optim: Component
    # `fill`: a parameter of the target that, when accepted and not given, takes a sibling's value.
    schedule: Component = attrs.field(
        factory=lambda: Component(target="functrain.schedule.constant"),
        metadata={"fill": {"total_steps": "steps"}},
    )
    step: list[Component] = attrs.field(metadata={"expect": "a non-empty list of components"})
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    log_every: int = _field(default=10, expect="an integer > 0", check=_positive)
    eval: EvalConfig = attrs.field(factory=EvalConfig)


# ---------------------------------------------------------------------------- YAML


_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)([eE][-+]?[0-9]+)\Z")


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus: `1e-3` is a float, dates stay strings, duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {key.value!r}",
                        key.start_mark,
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that `_Loader` would read as something else."""


for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [r for r in rs if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    return f"{where}invalid YAML: {what}"


# ---------------------------------------------------------------------------- public API


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; raise `RecipeError` listing every problem."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            [f"{TOP}: cannot read the recipe file: {getattr(err, 'strerror', None) or err}"], source
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError([_yaml_problem(err)], source) from None
    return parse_recipe({} if data is None else data, source=source, overrides=overrides)


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
    if problems:
        raise RecipeError(problems, source)
    return recipe


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data; components become `{_component_: target, **kwargs}`."""
    return _plain(recipe)


def _plain(value: Any) -> Any:
    if isinstance(value, Component):
        return {"_component_": value.target, **{k: _plain(v) for k, v in value.kwargs.items()}}
    if attrs.has(type(value)):
        return {k: _plain(getattr(value, f.name)) for k, f in config_fields(type(value)).items()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; `load_recipe` reads it back equal."""
    head = f"# resolved recipe of run {recipe.name!r}; continue it: functrain resume <this file> --from latest\n"
    body = yaml.dump(
        to_dict(recipe),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None,
        width=100,
        allow_unicode=True,
    )
    return head + body


def recipe_hash(recipe: Recipe) -> str:
    """sha256 hex digest of the canonical JSON (sorted keys) of `to_dict(recipe)`."""
    text = json.dumps(to_dict(recipe), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


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


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _override(raw: dict, text: str, problems: list[str]) -> None:
    """Apply one `dotted.key=value`; the value is YAML, so `optim.lr=1e-3` is a float."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        problems.append(
            f"{text}: malformed override; expected dotted.key=value, e.g. optim.lr=1e-3"
        )
        return
    try:
        value = yaml.load(value_text, Loader=_Loader)  # safe: _Loader is a SafeLoader
    except yaml.YAMLError as err:
        problems.append(f"{key}: cannot read the value {value_text!r}: {_yaml_problem(err)}")
        return
    set_path(raw, key, value, Recipe, problems)


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
            value = _plain(f.default.factory())  # validated too, so fill-ins show in the result
        elif f.default is not attrs.NOTHING:
            continue
        else:
            problems.append(f"{p}: missing; required: {_expect(f)}")
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
    if typing.get_origin(f.type) is list:
        if not isinstance(raw, list) or not raw:
            problems.append(f"{path}: got {show(raw)}; expected {_expect(f)}")
            return None
        return [component(item, f"{path}.{i}", problems) for i, item in enumerate(raw)]
    if attrs.has(f.type):
        return _section(f.type, raw, path, problems)
    problem = _scalar_problem(raw, f, path)
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


def _expect(f: attrs.Attribute) -> str:
    return f.metadata.get("expect") or describe(f.type)


def _scalar_problem(value: Any, f: attrs.Attribute, path: str) -> str | None:
    check = f.metadata.get("check")
    if type_ok(value, f.type) and (check is None or value is None or check(value)):
        return None
    return f"{path}: got {show(value)}; expected {_expect(f)}"
