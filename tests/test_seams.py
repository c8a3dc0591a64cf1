"""The seams the next features land on: transforms that declare what they are, one resume
plan, one name per module, user errors by class, no registries, a failed step said plainly."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import orjson
import pytest
import torch
import yaml
from conftest import assert_states_equal, cli, make_state, toy_data
from torch.utils.data import TensorDataset

import functrain as ft
from functrain import checkpoint
from functrain.checkpoint import describe, plan_resume
from functrain.data import fingerprint
from functrain.errors import ERROR_FILE_ENV, BuildError, MismatchError
from functrain.parallel import Placement
from functrain.recipe import load_recipe
from functrain.run.build import _with_reduction, step_parts, world_size_exact

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
PACKAGE = ROOT / "functrain"
ON_PATH = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
SHORT = ["steps=8", "checkpoint.every=4", "eval.every=null", "log_every=4"]


def _recipe_file(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    edit(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- transforms declare


def test_a_declared_wrapper_keeps_canonical_mode_whatever_its_name():
    recipe = load_recipe(
        TINY,
        ["step.0._component_=_seam_components.declared_wrapper", "step.0.micro_batches=1",
         "step.0.micro_batch_size=2"],
    )  # fmt: skip
    parts = step_parts(recipe)
    assert (parts.grads, parts.micro_batch_size, parts.parts[0].name) == (0, 2, "my_grads")
    assert world_size_exact(recipe, parts)
    names = [t.name for t in _with_reduction(parts, Placement(world_size=2), None)]
    assert names == ["my_grads", "tree_reduce_grads", "clip_by_global_norm", "apply_optimizer"]


def test_under_several_processes_an_undeclared_gradient_source_is_refused():
    recipe = load_recipe(TINY, ["step.0._component_=_seam_components.hidden_wrapper"])
    parts = step_parts(recipe)
    assert parts.grads is None and not world_size_exact(recipe, parts)
    with pytest.raises(BuildError, match=r"no transform declares produces_grads.*\.wrap"):
        _with_reduction(parts, Placement(world_size=2), None)


def test_a_wrapper_hiding_its_gradients_is_refused_before_any_file(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", *SHORT,
              "step.0._component_=_seam_components.hidden_wrapper", check=False, env=ON_PATH)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "step.0 (my_grads) leaves gradients in the state but does not declare it" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "tiny").exists()


def test_a_declared_wrapper_on_two_processes_has_the_bits_of_one(tmp_path, monkeypatch):
    from _dist_common import launch, timeless_metrics

    monkeypatch.setenv("PYTHONPATH", ON_PATH["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same CPU reduction split on both sides
    args = [TINY, f"out_dir={tmp_path}", *SHORT, "step.0._component_=_seam_components.declared_wrapper",
            "step.0.micro_batches=1", "step.0.micro_batch_size=2"]  # fmt: skip
    launch(1, "run", *args, "name=one")
    launch(2, "run", *args, "name=two")
    one, two = tmp_path / "one", tmp_path / "two"
    assert checkpoint.digests(one / "state_8") == checkpoint.digests(two / "state_8")
    assert timeless_metrics(one) == timeless_metrics(two)


# ---------------------------------------------------------------- one resume plan


def _fingerprint(batch_size: int = 8) -> dict:
    x, y = toy_data(64)
    return fingerprint(TensorDataset(x, y), batch_size=batch_size, shuffle=True, seed=0)


RECIPE = {
    "name": "a",
    "optim": {"_component_": "functrain.optim.adamw", "lr": 0.1},
    "step": [{"_component_": "functrain.steps.forward_backward", "micro_batches": 1}],
}


def _manifest(**changes) -> dict:
    now = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=2)
    return {"step": 5, "versions": checkpoint.versions(), **now, **changes}


def test_the_plan_accepts_what_fits_and_names_what_was_allowed():
    now = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=2)
    plan = plan_resume("s", _manifest(), now)
    assert (plan.step, plan.allowed, plan.warnings, plan.bitwise) == (5, [], [], True)
    free = {**RECIPE, "name": "b"}  # a free key: changes no bit
    assert plan_resume("s", _manifest(), {**now, "recipe": free}).allowed == []
    faster = {**RECIPE, "optim": {**RECIPE["optim"], "lr": 0.2}}
    with pytest.raises(MismatchError, match=r"optim\.lr: 0\.1 -> 0\.2") as refused:
        plan_resume("s", _manifest(), {**now, "recipe": faster})
    assert refused.value.what == "recipe"
    plan = plan_resume("s", _manifest(), {**now, "recipe": faster}, allow=["optim"])
    assert plan.allowed == ["optim.lr: 0.1 -> 0.2"] and plan.bitwise


def test_a_bucket_size_change_is_refused_only_where_it_can_change_bits():
    """bucket_mb cuts the overlapped reduction: free on 2 processes or for a canonical
    run, a recipe change on more (an all-reduce's bits may follow its buckets)."""
    recipe = {**RECIPE, "bucket_mb": 1.0}  # the snapshot's recipe: RECIPE (read as 0)
    for world, exact in ((2, False), (1, False), (4, True)):
        now = describe(recipe=recipe, data=_fingerprint(), device="cpu", world_size=world,
                       world_size_exact=exact)  # fmt: skip
        plan = plan_resume("s", _manifest(world_size=min(world, 2)), now)
        assert plan.allowed == ["bucket_mb: 0.0 -> 1.0"] and plan.bitwise
    now = describe(recipe=recipe, data=_fingerprint(), device="cpu", world_size=4)
    with pytest.raises(MismatchError, match=r"bucket_mb: 0\.0 -> 1\.0"):
        plan_resume("s", _manifest(world_size=4), now)


def test_a_manifest_spelling_a_moved_path_is_no_change():
    old = {
        **RECIPE,
        "step": [{"_component_": "functrain.step.forward_backward", "micro_batches": 1}],
    }
    now = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=2)
    assert plan_resume("s", _manifest(recipe=old), now).allowed == []


@pytest.mark.parametrize(
    "what, manifest_change, now_change",
    [
        ("data", {}, {"data": _fingerprint(batch_size=16)}),
        ("init_from", {"init_from": {"path": "w", "sha256": "a"}}, {"init_from": {"sha256": "b"}}),
        ("init_from", {}, {"init_from": {"path": "w", "sha256": "b"}}),
    ],
)
def test_the_plan_refuses_other_data_or_other_initial_weights(what, manifest_change, now_change):
    now = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=2)
    with pytest.raises(MismatchError) as refused:
        plan_resume("s", _manifest(**manifest_change), {**now, **now_change})
    assert refused.value.what == what


def test_the_plan_warns_of_world_size_only_where_bits_depend_on_it_and_of_software():
    base = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=1)
    (warning,) = plan_resume("s", _manifest(), base).warnings
    assert (
        "written by 2 process(es), this run has 1" in warning and "close to, not bitwise" in warning
    )
    exact = describe(
        recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=1, world_size_exact=True
    )
    assert plan_resume("s", _manifest(), exact).bitwise
    older = _manifest(versions={**checkpoint.versions(), "torch": "2.0.0"})
    (warning,) = plan_resume("s", older, {**base, "world_size": 2}).warnings
    assert warning.startswith("torch version differs: snapshot 2.0.0")


def test_library_restore_decides_by_the_same_plan_as_the_cli(tmp_path):
    meta = describe(recipe=RECIPE, data=_fingerprint())
    with checkpoint.Snapshots(tmp_path, meta=meta) as snapshots:
        snapshots.maybe_save(ft.step(make_state(), _batch()), last=True)
    faster = describe(
        recipe={**RECIPE, "optim": {**RECIPE["optim"], "lr": 0.2}}, data=_fingerprint()
    )
    with pytest.raises(MismatchError, match="optim.lr") as refused:
        checkpoint.Snapshots(tmp_path, meta=faster).restore(like=make_state())
    assert refused.value.what == "recipe"
    with pytest.raises(MismatchError, match="does not fit") as refused:  # structure, always
        checkpoint.Snapshots(tmp_path, meta=meta).restore(like=_other_state())
    assert refused.value.what == "structure"
    state, path = checkpoint.Snapshots(tmp_path, meta=faster).restore(
        like=make_state(), allow=["optim.lr"]
    )
    assert int(state.step) == 1 and path.name == "state_1"


def _batch():
    x, y = toy_data(16)
    return x, y


def _other_state():
    from conftest import toy_model

    model = toy_model()
    model.extra = torch.nn.Linear(2, 2)
    return make_state(model)


# ---------------------------------------------------------------- one name per module


def test_the_step_function_and_the_steps_module_do_not_collide():
    assert callable(ft.step) and ft.step is ft.steps.step
    assert ft.steps.forward_backward is ft.forward_backward
    assert ft.distributed.__name__ == "functrain.distributed"


def test_the_old_step_path_is_read_as_the_new_one_with_a_deprecation_message(capsys):
    recipe = load_recipe(TINY, ["step.0._component_=functrain.step.forward_backward"])
    assert recipe.step[0].target == "functrain.steps.forward_backward"
    err = capsys.readouterr().err
    assert "step.0._component_: functrain.step.forward_backward has moved to " in err
    assert "functrain.steps.forward_backward" in err and "deprecated" in err


# ---------------------------------------------------------------- user errors, no registries


def test_a_shipped_component_refusing_a_value_is_a_user_error_naming_field_and_line(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "model.n_head=3", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model (functrain.models.GPT): n_embd (32) must be divisible by n_head (3)" in res.stderr
    res = cli("run", TINY, f"out_dir={tmp_path}", "model.n_embd=-4", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model (functrain.models.GPT) raised RuntimeError" in res.stderr
    assert "(in gpt.py:" in res.stderr and not (tmp_path / "tiny").exists()


def test_samples_holding_python_lists_are_named_with_the_fix_before_the_step_fails(tmp_path):
    """An HF datasets.Dataset without with_format("torch") gives lists; collation cuts them
    into a list of per-position tensors. Said before the trial step, which then fails as
    parts that do not fit (exit 2); only said, as several targets per sample look alike."""
    res = cli("run", TINY, f"out_dir={tmp_path}", "data.dataset={_component_: "
              "_seam_components.list_rows}", "loss.input=input_ids", "loss.target=labels",
              check=False, env=ON_PATH)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "the first batch's field 'input_ids' is a list of 32 tensors" in res.stderr
    assert "with_format('torch')" in res.stderr and not (tmp_path / "tiny").exists()


def test_a_users_component_that_raises_keeps_its_traceback(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "model._component_=_seam_components.broken_model",
              check=False, env=ON_PATH)  # fmt: skip
    assert res.returncode == 1 and "Traceback" in res.stderr
    assert "in broken_model" in res.stderr and "this model cannot be built" in res.stderr
    assert not (tmp_path / "tiny").exists()


def test_a_bug_in_functrain_keeps_its_traceback(tmp_path, monkeypatch):
    from functrain import cli as cli_module
    from functrain.run import build

    def broken(*args, **kwargs):
        raise KeyError("a bug in functrain")

    monkeypatch.setattr(build, "create", broken)
    with pytest.raises(KeyError, match="a bug in functrain"):
        cli_module.main(["run", str(TINY), f"out_dir={tmp_path}", *SHORT])
    assert not (tmp_path / "tiny").exists()


def test_a_refusal_is_written_as_data_for_the_tools_that_launch_functrain(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "--until", "4")
    record = tmp_path / "error.json"
    res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "optim.lr=0.1", "--from", "latest",
              check=False, env={ERROR_FILE_ENV: str(record)})  # fmt: skip
    assert res.returncode == 2
    found = orjson.loads(record.read_bytes())
    assert (found["error"], found["what"]) == ("MismatchError", "recipe")
    assert "optim.lr" in found["message"]


def _module_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


_MUTATORS = {"add", "append", "extend", "update", "setdefault", "insert", "discard", "remove",
             "pop", "popitem", "clear"}  # fmt: skip


def registries(source: str) -> list[str]:
    """Module-level names that functions change: `global` rebinding, a mutating method
    call or an item assignment on them."""
    tree = ast.parse(source)
    module_names, found = _module_level_names(tree), []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found += [f"global {n}" for n in node.names]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in module_names
                and node.func.attr in _MUTATORS
            ):
                found.append(f"{node.func.value.id}.{node.func.attr}()")
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [
                    f"{t.value.id}[...] =" for t in targets
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                    and t.value.id in module_names
                ]  # fmt: skip
    return found


def test_no_module_keeps_a_mutable_registry():
    found = {
        str(p.relative_to(ROOT)): hits
        for p in sorted(PACKAGE.rglob("*.py"))
        if (hits := registries(p.read_text()))
    }
    assert found == {}


def test_the_registry_check_can_fail():
    source = "import weakref\n_SEEN = weakref.WeakSet()\ndef mark(x):\n    _SEEN.add(x)\n"
    assert registries(source) == ["_SEEN.add()"]
    assert registries("_N = 0\ndef bump():\n    global _N\n    _N += 1\n") == ["global _N"]
    assert registries("_C = {}\ndef put(k, v):\n    _C[k] = v\n") == ["_C[...] ="]


# ---------------------------------------------------------------- a failed step


def _failing(state, batch):
    raise RuntimeError("injected")


def test_a_failed_donating_step_says_its_input_is_gone_and_a_pure_one_keeps_it():
    transforms = [ft.forward_backward(), ft.apply_optimizer(), _failing]
    state = make_state(transforms=transforms)
    before = state.clone()
    with pytest.raises(RuntimeError, match="injected"):
        ft.step(state, _batch(), donate=False)
    assert_states_equal(state.tensors(), before.tensors())  # untouched and usable
    with pytest.raises(RuntimeError, match="injected"):
        ft.step(state, _batch())  # donated: apply_optimizer updated it in place
    with pytest.raises(ft.ConsumedStateError, match="failed part-way.*half an update"):
        state.params  # noqa: B018


def test_running_statistics_come_back_as_new_tensors():
    state = make_state()
    ema = state.stats["loss_ema"]
    new = ft.step(state, _batch())
    assert torch.isnan(ema) and not torch.isnan(new.stats["loss_ema"])  # not written in place


def test_the_trainer_says_the_state_is_gone_when_a_step_fails(tmp_path):
    def add_failure(raw):
        raw["step"].append({"_component_": "_seam_components.fail_at", "step": 7})

    recipe = _recipe_file(tmp_path, add_failure)
    res = cli("run", recipe, f"out_dir={tmp_path}", *SHORT, check=False, env=ON_PATH)
    assert res.returncode == 1 and "injected failure at step 7" in res.stderr
    assert "step 7 failed, and the state it was given is gone" in res.stderr
    assert f"the newest published snapshot is {tmp_path / 'tiny' / 'state_4'}" in res.stderr
    assert sorted(p.name for p in (tmp_path / "tiny").glob("state_*")) == ["state_4"]


def test_a_manifest_from_before_keys_were_added_is_read_with_their_defaults():
    now = describe(
        recipe={**RECIPE, "init_from": None, "init_from_map": {}, "freeze": [], "metrics": []},
        data=_fingerprint(), device="cpu", world_size=2,
    )  # fmt: skip
    assert plan_resume("s", _manifest(), now).allowed == []  # the manifest's recipe lacks them
    frozen = {**now, "recipe": {**now["recipe"], "freeze": ["x.*"]}}
    with pytest.raises(MismatchError, match=r"freeze\.0: <absent> -> x\.\*"):
        plan_resume("s", _manifest(), frozen)


def test_a_snapshot_without_a_recipe_is_refused_where_a_recipe_is_checked():
    now = describe(recipe=RECIPE, data=_fingerprint(), device="cpu", world_size=2)
    bare = {k: v for k, v in _manifest().items() if k not in ("recipe", "recipe_hash")}
    with pytest.raises(MismatchError, match="records no recipe") as refused:
        plan_resume("s", bare, now)
    assert refused.value.what == "recipe"


def test_restore_compares_expect_entries_the_plan_does_not_know(tmp_path):
    with checkpoint.Snapshots(tmp_path, meta={"experiment": "a"}) as snapshots:
        snapshots.maybe_save(ft.step(make_state(), _batch()), last=True)
    with pytest.raises(MismatchError, match="experiment: the snapshot has 'a', this run 'b'"):
        checkpoint.Snapshots(tmp_path).restore(like=make_state(), expect={"experiment": "b"})
    checkpoint.Snapshots(tmp_path).restore(like=make_state(), expect={"experiment": "a"})
