"""Components: import a `_component_` target, check kwargs against its signature, call it.

Also the small vocabulary every recipe check speaks: dotted paths (`join`), short value
descriptions (`show`), did-you-mean hints (`unknown`) and the scalar types a recipe value
can be checked against (`type_ok`, `describe`).
"""

import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs

from functrain import names
from functrain.errors import RecipeError, warn
from functrain.hashing import ABSENT

TOP = "<top level>"


MISSING: Any = ABSENT  # a key the recipe does not give


@attrs.frozen(kw_only=True)
class Component:
    """A call to make later: `target` is a dotted path, `kwargs` may nest Components."""

    target: str
    kwargs: dict = attrs.field(factory=dict)


#: The integers a recipe may hold: the state and a snapshot's manifest hold them as int64.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def outside_int64(value: Any) -> bool:
    """Whether `value` is an integer (not a bool) that int64 cannot hold."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_MIN <= value <= INT64_MAX
    )


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def unknown(path: str, key: Any, allowed: Any, what: str) -> str:
    """`path: unknown <what>; did you mean 'x'? allowed: ...` (accepted: for parameters)."""
    names = sorted(str(a) for a in allowed)
    close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    label = "accepted" if what.startswith("parameter") else "allowed"
    return f"{path}: unknown {what}{hint} {label}: {', '.join(names) or 'none'}"


# ---------------------------------------------------------------------------- components


_PLAIN = (str, int, float, bool, type(None))


def _value(raw: Any, path: str, problems: list[str]) -> Any:
    """A kwarg value: components nest at any depth inside mappings and lists."""
    if isinstance(raw, Mapping) and "_component_" in raw:
        return component(raw, path, problems)
    if isinstance(raw, Mapping):
        for k in raw:
            if not isinstance(k, str):
                problems.append(f"{join(path, k)}: key {show(k)} is not a string; use string keys")
        return {k: _value(v, join(path, k), problems) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_value(v, f"{path}.{i}", problems) for i, v in enumerate(raw)]
    if not isinstance(raw, _PLAIN):
        problems.append(
            f"{path}: got {show(raw)}; expected plain YAML values (str, number, bool, null, list, mapping)"
        )
    elif outside_int64(raw):
        problems.append(
            f"{path}: got {show(raw)}; expected an integer from -2**63 to 2**63 - 1 (int64, "
            "what a snapshot holds)"
        )
    return raw


def component(raw: Any, path: str, problems: list[str], provided: set[str] = frozenset()) -> Any:
    """Validate `{_component_: dotted.path, **kwargs}` against the target's signature."""
    usage = (
        "expected a mapping with '_component_: package.module.callable' and its keyword arguments"
    )
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: got {show(raw)}; {usage}")
        return None
    before = len(problems)
    kwargs = {}
    for k, v in raw.items():
        if k == "_component_":
            continue
        if isinstance(k, str) and k.isidentifier():
            kwargs[k] = _value(v, f"{path}.{k}", problems)
        else:
            problems.append(f"{join(path, k)}: {show(k)} is not a parameter name; use identifiers")
    target = raw.get("_component_", MISSING)
    if not isinstance(target, str):
        what = (
            f"missing; {usage}" if target is MISSING else f"got {show(target)}; expected a string"
        )
        problems.append(f"{path}._component_: {what}")
        return None
    written, (target, moved) = target, names.current(target)
    if moved:
        warn(f"{path}._component_: {written} has moved to {target}; the old path still works "
             "but is deprecated")  # fmt: skip
    fn, error = resolve(target)
    if error:
        problems.append(f"{path}._component_: {error}")
    else:
        _check_call(fn, target, kwargs, path, provided, problems)
    return Component(target=target, kwargs=kwargs) if len(problems) == before else None


def parse_component(raw: Any, path: str, source: str = "<component>") -> Component:
    """One `{_component_: dotted.path, **kwargs}` checked as a recipe's are (target
    imported, kwargs against its signature), calling nothing; `RecipeError` lists every
    problem.

    >>> parse_component({"_component_": "fractions.Fraction", "numerator": 1}, "x").target
    'fractions.Fraction'
    """
    problems: list[str] = []
    found = component(raw, path, problems)
    if problems or found is None:
        raise RecipeError(problems or [f"{path}: not a component"], source)
    return found


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+\Z")


def resolve(target: str) -> tuple[Any, str | None]:
    """Import `package.module.attr[.attr]`; return (object, None) or (None, why not)."""
    if not _DOTTED.match(target):
        return None, f"{target!r} is not a dotted path; expected 'package.module.callable'"
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
            break
        except Exception as err:
            missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
            if missing and (module == missing or module.startswith(missing + ".")):
                continue  # this prefix is no module; the rest may be attributes of a shorter one
            why = f"{type(err).__name__}: {err}"
            return None, f"cannot import {target!r}: importing {module} failed: {why}"
    else:
        return None, f"cannot import {target!r}: no module named {parts[0]!r}"
    for j in range(i, len(parts)):
        try:
            obj = getattr(obj, parts[j])
        except Exception:
            return (
                None,
                f"cannot import {target!r}: {'.'.join(parts[:j])} has no attribute or submodule {parts[j]!r}",
            )
    if not callable(obj):
        return None, f"{target!r} is not callable (it is {show(obj)})"
    return obj, None


_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def parameters(fn: Any) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """(parameters a recipe can pass by name, whether **kwargs is accepted), or None if unknown."""
    try:
        sig = inspect.signature(fn)
    except Exception:
        return None
    named = {p.name: p for p in sig.parameters.values() if p.kind in _KEYWORD}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return named, var_kw


def _check_call(
    fn: Any, target: str, kwargs: dict, path: str, provided: set[str], problems: list[str]
) -> None:
    params = parameters(fn)
    if params is None:
        return
    named, var_kw = params
    for k in kwargs:
        if k not in named and not var_kw:
            problems.append(unknown(f"{path}.{k}", k, named, f"parameter of {target}"))
    for p in inspect.signature(fn).parameters.values():
        if p.default is not p.empty or p.name in kwargs or p.name in provided:
            continue
        if p.kind in _KEYWORD:
            problems.append(f"{path}.{p.name}: missing; {target} requires it")
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            problems.append(
                f"{path}: {target} requires positional-only {p.name!r}, which a recipe cannot give"
            )
    hints = _hints(fn)
    for k, v in kwargs.items():
        hint = hints.get(k, MISSING)
        if (
            k in named
            and not isinstance(v, Component)
            and _checkable(hint)
            and not type_ok(v, hint)
        ):
            problems.append(f"{path}.{k}: got {show(v)}; {target} expects {describe(hint)}")


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:
        return {}


# ---------------------------------------------------------------------------- types


_SCALARS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}


def _union_args(hint: Any) -> tuple | None:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin is Union or origin is types.UnionType else None


def _checkable(hint: Any) -> bool:
    if hint in _SCALARS:
        return True
    if typing.get_origin(hint) is Literal:
        return all(isinstance(a, _PLAIN) for a in typing.get_args(hint))
    args = _union_args(hint)
    return args is not None and all(_checkable(a) for a in args)


def type_ok(value: Any, hint: Any) -> bool:
    if hint is bool or hint is type(None) or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    args = _union_args(hint)
    return args is None or any(type_ok(value, a) for a in args)


def describe(hint: Any) -> str:
    if hint in _SCALARS:
        return _SCALARS[hint]
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    args = _union_args(hint)
    if args:
        return " or ".join(describe(a) for a in args)
    if hint is Component:
        return (
            "a component: a mapping with `_component_: package.module.callable` and its arguments"
        )
    if attrs.has(hint):  # a config section
        return "a mapping of its keys (README: Recipes)"
    return getattr(hint, "__name__", "a value of another kind")  # never a <class ...> repr


# ---------------------------------------------------------------------------- instantiate


def instantiate(component: Component, **extra: Any) -> Any:
    """Call `component.target` with its kwargs (nested components built first) and `extra`.

    >>> instantiate(Component(target="fractions.Fraction", kwargs={"numerator": 1, "denominator": 2}))
    Fraction(1, 2)
    """
    fn, error = resolve(component.target)
    if error:
        raise RecipeError([f"{component.target}: {error}"], "<instantiate>")
    both = sorted(set(extra) & set(component.kwargs))
    if both:
        raise TypeError(
            f"instantiate({component.target}): {both} given by the recipe and by the caller"
        )
    kwargs = {k: _build(v) for k, v in component.kwargs.items()}
    return fn(**kwargs, **extra)


def _build(value: Any) -> Any:
    if isinstance(value, Component):
        return instantiate(value)
    if isinstance(value, Mapping):
        return {k: _build(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_build(v) for v in value]
    return value
