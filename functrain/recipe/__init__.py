"""Recipes: YAML -> a validated, frozen config whose parts are `_component_` calls.

    recipe = load_recipe("recipes/lm.yaml", ["optim.lr=1e-3"])
    optimizer = instantiate(recipe.optim)

A recipe is everything a run is made of, in one YAML file: name, seed, steps, device, and
the model, loss, data, optimizer, schedule and step transforms as components
(`{_component_: package.module.callable, **kwargs}`), plus the checkpoint and eval
settings. Validation imports every component's target and checks its kwargs against the
signature, but calls nothing; every problem is collected and reported in one `RecipeError`.

    schema.py     the config classes (`Recipe` and its sections), `SIGNALS`
    parse.py      `load_recipe`, `parse_recipe`: overrides, then validation
    serialize.py  `to_dict`, `dump_yaml`, `recipe_hash`, `diff`
    _check.py     `Component`: target import, signature and type checks (`parse_component`
                  for one), `instantiate`
    _yaml.py      the YAML dialect of recipe files
"""

from functrain.errors import RecipeError
from functrain.recipe._check import MISSING as MISSING  # what `diff` gives for an absent side
from functrain.recipe._check import Component, instantiate, parse_component, resolve
from functrain.recipe.parse import load_recipe, parse_recipe
from functrain.recipe.schema import SIGNALS, CheckpointConfig, DataConfig, EvalConfig, Recipe
from functrain.recipe.serialize import diff, dump_yaml, recipe_hash, to_dict

__all__ = [
    "SIGNALS",
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
    "parse_component",
    "parse_recipe",
    "recipe_hash",
    "resolve",
    "to_dict",
]
