"""The model `sample` and `export --hf` build for a snapshot, and what may be built at all.

A snapshot may come from anyone, and building a component runs its code. So its
manifest's `model` is rebuilt only when it is one of functrain's own models (a class under
`functrain.models.`, checked on the string before anything is imported); any other model
comes from `--recipe RECIPE.yaml` (your recipe file, validated as `functrain run` would),
or from the manifest under `--trust-recipe` (a snapshot you wrote). Even then the
manifest's model must be an `nn.Module` class with plain arguments, checked before it is
called; a factory function is called only from your own recipe file.

    model = rebuild_model(snapshot, manifest, recipe=Path("recipes/lm.yaml"))
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from functrain import names
from functrain.errors import RunError
from functrain.recipe import Component, instantiate, load_recipe, parse_component, resolve

__all__ = ["SHIPPED", "add_model_flags", "rebuild_model"]

#: The dotted-path prefix of the models a snapshot's manifest may rebuild unasked.
SHIPPED = "functrain.models."


def add_model_flags(p: argparse.ArgumentParser, only: str = "") -> None:
    """`--recipe FILE | --trust-recipe`: where the model comes from (`only`: for which option)."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="RECIPE.yaml",
        help="build the model from this recipe file (the run's), not from the snapshot's "
        f"manifest; needed for a model that is not functrain's own{only}",
    )
    source.add_argument(
        "--trust-recipe",
        action="store_true",
        help="build the model class the snapshot's manifest names, whatever it is; only "
        f"for a snapshot you wrote yourself{only}",
    )


def rebuild_model(
    snapshot: Path, manifest: dict, *, recipe: Path | None = None, trust: bool = False
) -> torch.nn.Module:
    """The model (weights not loaded): from the `recipe` file when given, else the one the
    manifest names — functrain's own, or any `nn.Module` class when `trust` is set."""
    if recipe is not None:
        component, source = load_recipe(recipe).model, str(recipe)
    else:
        component, source = _manifest_model(snapshot, manifest, trust), str(snapshot)
    fn, error = resolve(component.target)
    if error:
        raise RunError(f"{source}: cannot build the model: {error}")
    if isinstance(fn, type) and not issubclass(fn, torch.nn.Module):
        raise RunError(f"{source}: the model {component.target} is not a torch.nn.Module class")
    model = instantiate(component)
    if not isinstance(model, torch.nn.Module):
        raise RunError(
            f"{source}: the model {component.target} gave a {type(model).__name__}, not a "
            "torch.nn.Module; sample and export need the module the run trained"
        )
    return model


def _manifest_model(snapshot: Path, manifest: dict, trust: bool) -> Component:
    """The manifest's model component, refused unless it may be built (nothing imported
    before the prefix check; nothing called)."""
    recipe = manifest.get("recipe")
    spec = recipe.get("model") if isinstance(recipe, Mapping) else None
    target = spec.get("_component_") if isinstance(spec, Mapping) else None
    if not isinstance(target, str):
        raise RunError(f"{snapshot}: its manifest records no recipe model to rebuild")
    target = names.current(target)[0]
    if not trust and not target.startswith(SHIPPED):
        raise RunError(_refusal(snapshot, target, "is not one of functrain's own models", trust))
    nested = [k for k, v in spec.items() if k != "_component_" and _names_component(v)]
    if nested:
        why = f"takes components as arguments ({', '.join(nested)})"
        raise RunError(_refusal(snapshot, target, why, trust))
    fn, error = resolve(target)
    if error:
        raise RunError(f"{snapshot}: cannot rebuild the recipe's model: {error}")
    if not (isinstance(fn, type) and issubclass(fn, torch.nn.Module)):
        raise RunError(_refusal(snapshot, target, "is not a torch.nn.Module class", trust))
    # functrain.models.gpt.torch.nn.Linear would reach torch's class through gpt's imports
    if not trust and not fn.__module__.startswith(SHIPPED):
        raise RunError(_refusal(snapshot, target, "is not one of functrain's own models", trust))
    # its arguments against the signature, as a recipe's: a RecipeError names each problem
    return parse_component({**spec, "_component_": target}, "model", f"{snapshot}/manifest.json")


def _names_component(value: Any) -> bool:
    """Whether a `_component_` key lies anywhere inside `value` (a loop: JSON nests deep)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, Mapping):
            if "_component_" in v:
                return True
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return False


def _refusal(snapshot: Path, target: str, why: str, trust: bool) -> str:
    rule = (
        "--trust-recipe rebuilds an nn.Module class with plain arguments only; a factory "
        "function or nested components are built only from your own recipe file"
        if trust
        else "a snapshot may come from anyone and building its model runs code, so only "
        f"functrain's own models ({SHIPPED}*, with plain arguments) are rebuilt from a "
        "manifest unasked"
    )
    return (
        f"{snapshot}: its manifest names the model {target}, which {why}; {rule}. Pass "
        "--recipe RECIPE.yaml (the recipe the run was trained from: its model gets the "
        "snapshot's weights)" + ("" if trust else ", or --trust-recipe if you wrote this snapshot")
    )
