"""Recipes: validation with every problem reported, overrides, round trips, hash, diff."""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import textwrap
import time
import typing
from pathlib import Path

import attrs
import pytest
from conftest import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functrain import checkpoint
from functrain.recipe import (
    CheckpointConfig,
    Component,
    DataConfig,
    EvalConfig,
    Recipe,
    RecipeError,
    diff,
    dump_yaml,
    instantiate,
    load_recipe,
    parse_recipe,
    recipe_hash,
    to_dict,
)

T = "_toy_components."  # tests/ is on sys.path under pytest's default import mode


def valid() -> dict:
    return {
        "name": "toy",
        "steps": 100,
        "model": {"_component_": T + "Model", "width": 8},
        "loss": {"_component_": T + "loss"},
        "data": {"dataset": {"_component_": T + "dataset", "size": 64}, "batch_size": 8},
        "optim": {"_component_": T + "optimizer", "lr": 1e-3},
        "schedule": {"_component_": T + "constant"},
        "step": [
            {"_component_": T + "forward_backward", "micro_batches": 1},
            {"_component_": T + "clip", "max_norm": 1.0},
            {"_component_": T + "apply"},
        ],
    }


def problems_of(data, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, overrides=overrides)
    return info.value.problems


def with_(path: str, value, base: dict | None = None) -> dict:
    """A copy of the valid recipe with `value` set at dotted `path` (lists by index)."""
    data = copy.deepcopy(base or valid())
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[int(last) if isinstance(node, list) else last] = value
    return data


def without(path: str) -> dict:
    data = valid()
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    return data


# ---------------------------------------------------------------------------- valid recipes


def test_valid_recipe_gets_defaults_and_keeps_components_uninstantiated():
    r = parse_recipe(valid())
    assert (r.name, r.out_dir, r.seed, r.steps, r.device, r.log_every) == (
        "toy",
        "runs",
        0,
        100,
        "auto",
        10,
    )
    assert r.data == DataConfig(
        dataset=Component(target=T + "dataset", kwargs={"size": 64}),
        batch_size=8,
        shuffle=True,
        num_workers=0,
    )
    assert r.checkpoint == CheckpointConfig(every=None, keep_last=None)
    assert r.eval == EvalConfig(every=None, batches=10)
    assert r.optim == Component(target=T + "optimizer", kwargs={"lr": 1e-3})
    assert [c.target for c in r.step] == [T + "forward_backward", T + "clip", T + "apply"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.steps = 5  # type: ignore[misc]


def test_schedule_defaults_to_constant():
    data = valid()
    del data["schedule"]
    assert parse_recipe(data).schedule == Component(target="functrain.schedule.constant", kwargs={})


def test_total_steps_is_filled_from_steps_and_shown_in_the_resolved_recipe():
    data = with_("schedule", {"_component_": T + "cosine", "warmup_steps": 10})
    r = parse_recipe(data)
    assert r.schedule.kwargs == {"warmup_steps": 10, "total_steps": 100}
    assert to_dict(r)["schedule"]["total_steps"] == 100
    assert parse_recipe(data, overrides=["steps=40"]).schedule.kwargs["total_steps"] == 40
    given_ = with_("schedule.total_steps", 70, data)
    assert parse_recipe(given_).schedule.kwargs["total_steps"] == 70
    assert parse_recipe(valid()).schedule.kwargs == {}  # constant takes no total_steps
    # A bad `steps` is reported once, not again as a missing total_steps.
    assert problems_of(with_("steps", 0, data)) == [
        "steps: got 0 (int); expected an integer > 0 (total optimizer steps)"
    ]


def test_yaml_file_reads_scientific_notation_as_float_and_dates_as_strings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        # functrain run r.yaml
        name: toy
        steps: 10
        model: {{_component_: {T}Model, width: 4}}
        loss: {{_component_: {T}loss}}
        data: {{dataset: {{_component_: {T}dataset, size: 8}}, batch_size: 2}}
        optim: {{_component_: {T}optimizer, lr: 1e-3, weight_decay: 1.0e1}}
        step:
          - {{_component_: {T}anything, a: 2E+2, b: -5e-1, c: 2024-01-02, d: "1e-3", e: 1_0}}
        """)
    )
    r = load_recipe(path)
    assert r.optim.kwargs == {"lr": 0.001, "weight_decay": 10.0}
    kw = r.step[0].kwargs
    assert kw == {"a": 200.0, "b": -0.5, "c": "2024-01-02", "d": "1e-3", "e": 10}
    assert [type(v) for v in kw.values()] == [float, float, str, str, int]


# ---------------------------------------------------------------------------- file-level errors


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: toy\nsteps: 10\nmodel: {a: 1\nloss: x\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 1 problem in the recipe:")
    assert "line 4, column 5: invalid YAML" in text and "Traceback" not in text


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nsteps: 1\nname: b\n")
    with pytest.raises(RecipeError, match=r"line 3, column 1: invalid YAML: duplicate key 'name'"):
        load_recipe(path)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(
        RecipeError,
        match=r"(?s)nope\.yaml: 1 problem.*cannot read the recipe file: No such file or directory$",
    ):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "<top level>: got [1, 2] (list); expected a mapping of recipe keys"
    ]


def test_self_referencing_yaml_is_a_recipe_error(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(f"name: toy\nsteps: 1\nmodel: &m {{_component_: {T}anything, me: *m}}\n")
    with pytest.raises(RecipeError, match="refers to itself"):
        load_recipe(path)


def test_empty_file_lists_every_missing_required_key(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["name", "steps", "model", "loss", "data", "optim", "step"]
    assert (
        info.value.problems[1] == "steps: missing; required: an integer > 0 (total optimizer steps)"
    )
    assert "model: missing; required: a component: a mapping with `_component_:" in str(info.value)
    assert "<class" not in str(info.value)  # what is required is said in words, never a repr
    with pytest.raises(RecipeError) as info:  # a section's missing component, too
        path.write_text("data: {}\n")
        load_recipe(path)
    assert "data.dataset: missing; required: a component" in str(info.value)
    assert "<class" not in str(info.value)


# ---------------------------------------------------------------------------- key and value errors


def test_unknown_keys_list_allowed_and_suggest_close_match():
    data = with_("optimizer", {}, with_("data.batchsize", 3))
    found = problems_of(data)
    assert (
        "data.batchsize: unknown key; did you mean 'batch_size'? allowed: batch_size, dataset, num_workers, replay, shuffle"
        in found
    )
    assert any(
        p.startswith(
            "optimizer: unknown key; did you mean 'optim'? allowed: activation_checkpointing, auto_resume, bucket_mb, checkpoint,"
        )
        for p in found
    )


@pytest.mark.parametrize("path", ["data.dataset", "data.batch_size"])
def test_missing_required_section_keys(path):
    assert [p.split(":")[0] for p in problems_of(without(path))] == [path]
    assert "missing; required" in problems_of(without(path))[0]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("steps", True, "steps: got True (bool); expected an integer > 0"),
        ("steps", 0, "steps: got 0 (int); expected an integer > 0"),
        ("steps", 2.0, "steps: got 2.0 (float); expected an integer > 0"),
        ("seed", -1, "seed: got -1 (int); expected an integer >= 0"),
        ("name", "a/b", "name: got 'a/b' (str); expected a name of letters, digits"),
        ("name", "..", "name: got '..' (str); expected a name of letters"),
        ("name", 5, "name: got 5 (int); expected a name"),
        ("out_dir", "", "out_dir: got '' (str); expected a non-empty path"),
        ("device", "gpu", "device: got 'gpu' (str); expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("device", "cuda:x", "device: got 'cuda:x' (str)"),
        ("log_every", 0, "log_every: got 0 (int); expected an integer > 0"),
        ("data.batch_size", "8", "data.batch_size: got '8' (str); expected an integer > 0"),
        ("data.shuffle", "yes", "data.shuffle: got 'yes' (str); expected true or false"),
        ("data.num_workers", -2, "data.num_workers: got -2 (int); expected an integer >= 0"),
        ("checkpoint.every", 0, "checkpoint.every: got 0 (int); expected an integer > 0, or null"),
        (
            "checkpoint.keep_last",
            1.5,
            "checkpoint.keep_last: got 1.5 (float); expected an integer > 0, or null",
        ),
        ("eval.batches", None, "eval.batches: got None (NoneType); expected an integer > 0"),
        ("eval", [1], "eval: got [1] (list); expected a mapping"),
        ("step", [], "step: got [] (list); expected a non-empty list of components"),
        ("step", {"_component_": T + "apply"}, "step: got {'_component_'"),
        (
            "data.dataset.block",
            "x",
            f"data.dataset.block: got 'x' (str); {T}dataset expects an integer or null",
        ),
        ("model.act", 3, f"model.act: got 3 (int); {T}Model expects a string or null"),
        ("model.depth", False, f"model.depth: got False (bool); {T}Model expects an integer"),
        ("optim.lr", True, f"optim.lr: got True (bool); {T}optimizer expects a number"),
        (
            "loss.reduction",
            "max",
            f"loss.reduction: got 'max' (str); {T}loss expects one of 'mean', 'sum'",
        ),
    ],
)
def test_wrong_types_and_values_name_the_key(path, value, expected):
    found = problems_of(with_(path, value))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_int_is_accepted_where_float_is_expected_and_null_where_optional():
    r = parse_recipe(with_("checkpoint", {"every": None, "keep_last": 2}, with_("optim.lr", 1)))
    assert r.optim.kwargs["lr"] == 1 and r.checkpoint.keep_last == 2


# ---------------------------------------------------------------------------- component errors


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"width": 3},
            "model._component_: missing; expected a mapping with '_component_: package.module.callable'",
        ),
        (
            {"_component_": 7},
            "model._component_: got 7 (int); expected a string",
        ),
        ({"_component_": "Model"}, "model._component_: 'Model' is not a dotted path"),
        (
            {"_component_": "no_such_pkg.mod.Model"},
            "model._component_: cannot import 'no_such_pkg.mod.Model': no module named 'no_such_pkg'",
        ),
        (
            {"_component_": T + "Nope"},
            f"model._component_: cannot import '{T}Nope': _toy_components has no attribute or submodule 'Nope'",
        ),
        (
            {"_component_": T + "NOT_CALLABLE"},
            f"model._component_: '{T}NOT_CALLABLE' is not callable (it is 42 (int))",
        ),
        ("Model", "model: got 'Model' (str); expected a mapping with '_component_"),
        (
            {"_component_": T + "needs_position"},
            f"model: {T}needs_position requires positional-only 'x'",
        ),
    ],
)
def test_component_target_errors(value, expected):
    found = problems_of(with_("model", value))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_import_error_inside_a_module_is_reported_briefly(tmp_path, monkeypatch):
    (tmp_path / "toy_broken_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = problems_of(with_("model", {"_component_": "toy_broken_mod.Model"}))
    assert found == [
        "model._component_: cannot import 'toy_broken_mod.Model': importing toy_broken_mod failed: "
        "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
    ]


def test_unknown_and_missing_kwargs_list_the_accepted_parameters():
    found = problems_of(with_("model", {"_component_": T + "Model", "widht": 3}))
    assert found == [
        f"model.widht: unknown parameter of {T}Model; did you mean 'width'? accepted: act, attn, depth, width",
        f"model.width: missing; {T}Model requires it",
    ]
    assert parse_recipe(with_("model", {"_component_": T + "anything", "zzz": [1, {"a": None}]}))


def test_nested_components_are_validated_with_their_dotted_paths():
    model = {
        "_component_": T + "Model",
        "width": 2,
        "attn": {"_component_": T + "Attention", "heads": "four"},
    }
    assert problems_of(with_("model", model)) == [
        f"model.attn.heads: got 'four' (str); {T}Attention expects an integer"
    ]
    deep = {"_component_": T + "anything", "layers": [{"sub": {"_component_": "nope_mod.X"}}], 3: 1}
    assert problems_of(with_("model", deep)) == [
        "model.layers.0.sub._component_: cannot import 'nope_mod.X': no module named 'nope_mod'",
        "model.3: 3 (int) is not a parameter name; use identifiers",
    ]
    assert problems_of(
        with_("model.x", {1: b"raw"}, with_("model._component_", T + "anything"))
    ) == [
        "model.x.1: key 1 (int) is not a string; use string keys",
        "model.x.1: got b'raw' (bytes); expected plain YAML values (str, number, bool, null, list, mapping)",
    ]


def test_every_problem_is_reported_at_once_and_the_message_lists_them(tmp_path):
    data = with_("steps", -3, with_("optim.lrr", 0.1, with_("step.1._component_", "nope_mod.clip")))
    path = tmp_path / "three.yaml"
    path.write_text(dump_like(data))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert [p.split(":")[0] for p in err.problems] == ["steps", "optim.lrr", "step.1._component_"]
    text = str(err)
    assert text.startswith(f"{path}: 3 problems in the recipe:\n  - steps: got -3")
    assert all(f"\n  - {p}" in text for p in err.problems)


def dump_like(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def test_configs_built_in_code_are_checked_too():
    r = parse_recipe(valid())
    with pytest.raises(RecipeError, match=r"Recipe.name: got '\.\./x' \(str\)"):
        attrs.evolve(r, name="../x")
    with pytest.raises(RecipeError, match=r"CheckpointConfig.every: got 0"):
        CheckpointConfig(every=0)


# ---------------------------------------------------------------------------- overrides


def test_overrides_are_typed_by_yaml_with_scientific_notation_as_float():
    r = parse_recipe(
        valid(),
        overrides=[
            "optim.lr=1e-3",
            "optim.weight_decay=5E-2",
            "steps=250",
            "data.shuffle=false",
            "name=run-2",
            "step.1.max_norm=0.5",
            "optim.betas=[0.9, 0.95]",
            "checkpoint.every=50",
            "eval={every: 10, batches: 2}",
            "model.act=null",
        ],
    )
    assert r.optim.kwargs == {"lr": 0.001, "weight_decay": 0.05, "betas": [0.9, 0.95]}
    assert type(r.optim.kwargs["lr"]) is float
    assert (r.steps, r.data.shuffle, r.name, r.step[1].kwargs) == (
        250,
        False,
        "run-2",
        {"max_norm": 0.5},
    )
    assert r.checkpoint == CheckpointConfig(every=50) and r.eval == EvalConfig(every=10, batches=2)
    assert r.model.kwargs == {"width": 8, "act": None}


def test_override_can_replace_a_whole_component_and_its_target():
    r = parse_recipe(valid(), overrides=[f"schedule={{_component_: {T}cosine, warmup_steps: 5}}"])
    assert r.schedule == Component(
        target=T + "cosine", kwargs={"warmup_steps": 5, "total_steps": 100}
    )
    r = parse_recipe(valid(), overrides=[f"model._component_={T}anything", "model.anything_goes=1"])
    assert r.model.kwargs == {"width": 8, "anything_goes": 1}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "optim.lrr=0.1",
            f"optim.lrr: unknown parameter of {T}optimizer; did you mean 'lr'? accepted: betas, lr, weight_decay",
        ),
        (
            "stpes=3",
            "stpes: unknown key; did you mean 'steps'? allowed: activation_checkpointing, auto_resume, bucket_mb, checkpoint, compile, data,",
        ),
        (
            "checkpoint.evry=3",
            "checkpoint.evry: unknown key; did you mean 'every'? allowed: async, every, grace, keep_every, keep_last, on_error, signal, trainable_only",
        ),
        (
            "data.dataset.sise=3",
            f"data.dataset.sise: unknown parameter of {T}dataset; did you mean 'size'? accepted: block, size",
        ),
        ("step.3.max_norm=1", "step.3: no such index; step has 3 items"),
        ("step.x=1", "step.x: no such index; step has 3 items"),
        ("steps.x=1", "steps.x: steps is 100 (int), which has no keys"),
        (
            "model.attn.heads=2",
            "model.attn: not set in the recipe; override the whole value, e.g. model.attn={...}",
        ),
        ("steps", "steps: malformed override; expected dotted.key=value, e.g. optim.lr=1e-3"),
        ("=3", "=3: malformed override"),
        ("optim..lr=3", "optim..lr=3: malformed override"),
        ("optim.lr=[1,", "optim.lr: cannot read the value '[1,': line 1, column 4: invalid YAML"),
        ("steps=1e3", "steps: got 1000.0 (float); expected an integer > 0"),
        ("optim.lr=fast", f"optim.lr: got 'fast' (str); {T}optimizer expects a number"),
    ],
)
def test_bad_overrides_are_rejected_naming_the_key(override, expected):
    found = problems_of(valid(), [override])
    assert len(found) == 1 and found[0].startswith(expected), found


def test_override_problems_are_reported_with_the_recipe_problems():
    found = problems_of(with_("seed", -1), ["optim.lrr=1", "nope"])
    assert [p.split(":")[0] for p in found] == ["optim.lrr", "nope", "seed"]


def test_overrides_do_not_touch_the_caller_data():
    data = valid()
    before = copy.deepcopy(data)
    parse_recipe(data, overrides=["optim.lr=0.5", "step.0.micro_batches=2", "checkpoint.every=3"])
    assert data == before


def test_overrides_must_be_a_sequence_of_strings():
    with pytest.raises(TypeError, match="sequence of 'key=value' strings"):
        parse_recipe(valid(), overrides="optim.lr=1")


# ---------------------------------------------------------------------------- dump, hash, diff


def tricky() -> dict:
    kwargs = {
        "s1": "1e-3",
        "s2": "2024-01-02",
        "s3": "yes",
        "s4": "null",
        "s5": "",
        "f": 1e-20,
        "i": 2**63 - 1,  # the largest integer a recipe may hold
    }
    kwargs |= {
        "nested": {
            "list": [1, 2.5, None, True],
            "deep": {"_component_": T + "Attention", "heads": 2},
        }
    }
    return with_(
        "step.0", {"_component_": T + "anything", **kwargs}, with_("checkpoint", {"every": 5})
    )


def test_dump_yaml_round_trips_exactly(tmp_path):
    r = parse_recipe(tricky())
    text = dump_yaml(r)
    assert text.startswith("# ") and "functrain resume" in text.splitlines()[0]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    back = load_recipe(path)
    assert back == r
    assert to_dict(back) == to_dict(r) and recipe_hash(back) == recipe_hash(r)
    kw = back.step[0].kwargs
    assert (kw["s1"], kw["s2"], kw["s3"], kw["s4"], kw["i"]) == (
        "1e-3",
        "2024-01-02",
        "yes",
        "null",
        2**63 - 1,
    )


def test_to_dict_is_plain_and_resolved():
    d = to_dict(parse_recipe(valid()))
    assert list(d) == [f.name for f in attrs.fields(Recipe)]
    assert d["checkpoint"] == {
        "every": None,
        "keep_last": None,
        "keep_every": None,
        "async": False,
        "trainable_only": False,
        "on_error": "stop",
        "signal": None,
        "grace": 30.0,
    } and d["eval"] == {
        "every": None,
        "batches": 10,
    }
    assert d["step"][1] == {"_component_": T + "clip", "max_norm": 1.0}


def test_recipe_hash_is_stable_and_sensitive():
    a = recipe_hash(parse_recipe(valid()))
    reordered = dict(reversed(list(valid().items())))
    assert a == recipe_hash(parse_recipe(reordered)) == recipe_hash(parse_recipe(valid()))
    assert len(a) == 64 and int(a, 16) >= 0
    changed = {
        recipe_hash(parse_recipe(valid(), overrides=[o]))
        for o in [
            "optim.lr=0.002",
            "step.1.max_norm=2.0",
            "data.shuffle=false",
            "seed=1",
            "optim.betas=[0.9, 0.9]",
        ]
    }
    assert len(changed) == 5 and a not in changed
    assert recipe_hash(parse_recipe(with_("optim.lr", 1))) != recipe_hash(
        parse_recipe(with_("optim.lr", 1.0))
    )


def test_diff_lists_changed_added_and_removed_leaves():
    old = to_dict(parse_recipe(valid()))
    new = to_dict(
        parse_recipe(
            valid(), overrides=["optim.lr=0.01", "optim.betas=[0.9, 0.95]", "step.1.max_norm=2.0"]
        )
    )
    del new["log_every"]
    new["step"].append({"_component_": T + "apply"})
    changes = diff(old, new)
    assert changes == [
        ("optim.lr", 0.001, 0.01),
        ("optim.betas", diff_missing(), [0.9, 0.95]),
        ("step.1.max_norm", 1.0, 2.0),
        ("step.3", diff_missing(), {"_component_": T + "apply"}),
        ("log_every", 10, diff_missing()),
    ]
    assert repr(changes[1][1]) == "<absent>"
    assert diff(old, old) == [] and diff({"x": math.nan}, {"x": math.nan}) == []
    assert diff({"a": 1}, {"a": 1.0}) == [("a", 1, 1.0)]
    assert diff({"a": {"b": 1}}, {"a": 2}) == [("a", {"b": 1}, 2)]


def diff_missing():
    from functrain.recipe import MISSING

    return MISSING


# ---------------------------------------------------------------------------- instantiate


def test_instantiate_builds_nested_components_first_and_takes_extra():
    from _toy_components import Attention, Model

    model = {
        "_component_": T + "Model",
        "width": 3,
        "attn": {"_component_": T + "Attention", "heads": 2},
    }
    r = parse_recipe(with_("model", model))
    assert instantiate(r.model) == Model(width=3, attn=Attention(heads=2))
    built = instantiate(
        Component(
            target=T + "anything",
            kwargs={
                "xs": [Component(target=T + "Attention")],
                "d": {"a": Component(target=T + "apply")},
            },
        )
    )
    assert built == {"xs": [Attention(heads=4)], "d": {"a": "apply"}}
    assert instantiate(Component(target=T + "needs_extra", kwargs={"size": 2}), device="cpu") == (
        "cpu",
        2,
    )
    with pytest.raises(TypeError, match=r"\['size'\] given by the recipe and by the caller"):
        instantiate(Component(target=T + "needs_extra", kwargs={"size": 2}), size=3)
    with pytest.raises(RecipeError, match="no module named 'nope_mod'"):
        instantiate(Component(target="nope_mod.x"))


def test_validation_calls_nothing():
    calls = []
    import _toy_components

    _toy_components.record = lambda: calls.append(1)  # type: ignore[attr-defined]
    try:
        parse_recipe(with_("loss", {"_component_": T + "record"}))
    finally:
        del _toy_components.record
    assert calls == []


# ---------------------------------------------------------------------------- fuzzing


_TARGETS = st.sampled_from(
    [T + "Model", T + "anything", "nope_mod.x", "math.pi", "builtins.len", "x", ""]
)
_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | _TARGETS
_KEYS = (
    st.sampled_from(["_component_", "lr", "every", "steps", "width", "0"])
    | st.text(max_size=4)
    | st.integers()
)
_VALUES = st.recursive(
    _SCALAR | st.binary(max_size=3) | st.tuples(st.integers()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=6,
)
_OVERRIDE_KEYS = [
    "optim.lr",
    "step.0.x",
    "checkpoint.every",
    "eval.every",
    "seed",
    "steps",
    "model",
    "a.b",
]
_OVERRIDE_VALUES = st.sampled_from(
    ["0.5", "3", "1e-3", "null", "true", "[1, 2]", "{a: 1}"]
) | st.text(max_size=6)
_OVERRIDES = st.lists(
    st.builds("{}={}".format, st.sampled_from(_OVERRIDE_KEYS), _OVERRIDE_VALUES)
    | st.text(max_size=8),
    max_size=2,
)


def _mutate(node, data) -> None:
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        if isinstance(node[key], (dict, list)) and data.draw(st.booleans()):
            node = node[key]
            continue
        break
    op = data.draw(st.sampled_from(["set", "add", "delete"]))
    if op == "delete" and keys:
        del node[key]
    elif op == "set" and keys:
        node[key] = data.draw(_VALUES)
    elif isinstance(node, dict):
        node[data.draw(_KEYS)] = data.draw(_VALUES)
    else:
        node.append(data.draw(_VALUES))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_mutations_parse_or_raise_recipe_error(data):
    recipe = valid()
    for _ in range(data.draw(st.integers(0, 3))):
        _mutate(recipe, data)
    try:
        parsed = parse_recipe(recipe, overrides=data.draw(st.just([]) | _OVERRIDES))
    except RecipeError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        assert str(err).startswith("<recipe>: ")
    else:
        assert isinstance(parsed, Recipe)
        assert len(recipe_hash(parsed)) == 64 and isinstance(dump_yaml(parsed), str)


# ---------------------------------------------------------------------------- bounds


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the body past `seconds`, so that code which would run on for
    minutes (and gigabytes) fails the test instead."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# "billion laughs": under 1 KB of YAML naming 9**10 values
ALIAS_BOMB = f"l0: &l0 [{', '.join(['x'] * 9)}]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


def test_yaml_alias_bomb_is_refused_at_once_naming_its_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: toy\nsteps: 1\n" + ALIAS_BOMB)
    assert path.stat().st_size < 1024
    start = time.perf_counter()
    with deadline(5), pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.perf_counter() - start < 5
    assert info.value.problems == [
        "line 8, column 10: alias *l4 takes the recipe past 100000 values (an alias counts "
        "every value it names, each time it is used); a recipe is configuration: keep data "
        "in the files it names"
    ]
    res = cli("run", path, f"out_dir={tmp_path / 'runs'}", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{path}: 1 problem in the recipe:\n  - line 8, column 10: alias *l4" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_yaml_nested_past_the_depth_bound_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: toy\nsteps: 1\nmodel: " + "[" * 5000 + "]" * 5000 + "\n")
    with deadline(5), pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "line 3, column 107: lists and mappings nest more than 100 deep; flatten them"
    ]


def test_recipe_over_1_mib_is_refused_by_its_size(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(dump_yaml(parse_recipe(valid())) + "# " + "x" * (1 << 20) + "\n")
    size = path.stat().st_size
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        f"<top level>: the recipe file is {size} bytes; a recipe may hold at most 1048576 "
        "bytes (1 MiB): it is configuration, so keep data in the files it names"
    ]


def test_override_value_over_64_kib_is_refused_by_its_length():
    assert problems_of(valid(), ["name=" + "a" * 70_000]) == [
        "name: the override value is 70000 characters, over the limit of 65536 (64 KiB); "
        "put a larger value in the recipe file"
    ]


def test_integers_past_int64_are_refused_naming_the_field():
    overrides = [f"steps={2**63}", f"checkpoint.every={2**64}", f"optim.lr={2**64}"]
    assert problems_of(valid(), overrides) == [
        "steps: got 9223372036854775808 (int); expected an integer > 0 (total optimizer "
        "steps), at most 2**63 - 1",
        "optim.lr: got 18446744073709551616 (int); expected an integer from -2**63 to "
        "2**63 - 1 (int64, what a snapshot holds)",
        "checkpoint.every: got 18446744073709551616 (int); expected an integer > 0, or null "
        "(only the final snapshot), at most 2**63 - 1",
    ]
    top = (2**63 - 1) // valid()["data"]["batch_size"]  # the samples counted fit int64
    recipe = parse_recipe(valid(), overrides=[f"steps={top}", f"checkpoint.every={2**63 - 1}"])
    assert recipe.steps == top and recipe.checkpoint.every == 2**63 - 1
    (problem,) = problems_of(valid(), [f"steps={top + 1}"])
    assert problem.startswith(f"steps: {top + 1} steps of data.batch_size")
    assert problem.endswith(
        f"more than the data cursor (int64) counts: at most {top} steps at this batch size"
    )


def test_a_run_at_the_largest_step_count_snapshots_and_resumes(tmp_path):
    """The bound is what the state and a snapshot hold: a run at it writes, reads back and
    continues (it was a raw ValueError at the first snapshot past int64)."""
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    top = (2**63 - 1) // 8  # tiny.yaml's batch size
    args = [f"out_dir={tmp_path}", f"steps={top}", "checkpoint.every=1", "eval.every=null"]
    cli("run", tiny, *args, "--until", "2")
    res = cli("resume", tiny, *args, "--from", "latest", "--until", "3")
    assert "Traceback" not in res.stderr
    manifest = checkpoint.read_manifest(tmp_path / "tiny" / "state_3")
    assert manifest["step"] == 3 and manifest["recipe"]["steps"] == top
    res = cli("run", tiny, *args[:1], "name=over", f"steps={top + 1}", check=False)
    assert res.returncode == 2 and "more than the data cursor (int64) counts" in res.stderr


def _int_fields(cls: type = Recipe, prefix: str = "") -> list[str]:
    """The recipe keys of every field that holds an integer, in every section."""
    out = []
    for f in attrs.fields(cls):
        key = prefix + f.metadata.get("key", f.name)
        if attrs.has(f.type):
            out += _int_fields(f.type, key + ".")
        elif f.type is int or int in typing.get_args(f.type):
            out.append(key)
    return out


@pytest.mark.parametrize("key", _int_fields())
def test_every_integer_field_is_bounded_by_int64(key):
    assert {"seed", "steps", "data.batch_size", "checkpoint.keep_last", "eval.batches"} <= set(
        _int_fields()
    )
    (problem,) = problems_of(valid(), [f"{key}={2**63}"])
    assert problem.startswith(f"{key}: got 9223372036854775808 (int); expected an integer")
    assert problem.endswith(", at most 2**63 - 1")
    if key in ("steps", "data.batch_size"):  # their product counts samples: bounded together
        (problem,) = problems_of(valid(), [f"{key}={2**63 - 1}"])
        assert "more than the data cursor (int64) counts" in problem
    else:
        parse_recipe(valid(), overrides=[f"{key}={2**63 - 1}"])


def test_integer_too_long_for_python_is_a_recipe_error(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("name: toy\nsteps: " + "1" * 5000 + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "line 2, column 8: an integer of 5000 characters; a recipe's integers are at most "
        "2**63 - 1 (int64)"
    ]


def test_recipe_with_a_few_anchors_and_a_merge_still_loads(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            name: toy
            steps: 100
            model: {{_component_: {T}Model, width: &width 8}}
            loss: {{_component_: {T}loss}}
            data:
              dataset: {{_component_: {T}dataset, size: 64}}
              batch_size: *width
            optim: &optim {{_component_: {T}optimizer, lr: 1.0e-3}}
            schedule: {{_component_: {T}constant}}
            step:
              - {{_component_: {T}forward_backward, micro_batches: 1}}
              - {{_component_: {T}clip, max_norm: 1.0}}
              - {{_component_: {T}apply}}
            checkpoint: &every {{every: 10}}
            eval: {{<<: *every, batches: 2}}
        """)
    )
    recipe = load_recipe(path, ["optim.lr=2.0e-3"])
    assert recipe.data.batch_size == recipe.model.kwargs["width"] == 8
    assert recipe.checkpoint.every == recipe.eval.every == 10 and recipe.eval.batches == 2
    assert recipe.optim.kwargs["lr"] == 2.0e-3
