"""The real CLI in subprocesses: run, resume (exact), inspect, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from _rel_common import tree
from conftest import cli
from conftest import timeless_metrics as metrics

from functrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def digests(snapshot: Path) -> dict:
    report = orjson.loads(cli("inspect", snapshot, "--json").stdout)
    assert report["valid"] and report["step"] == int(snapshot.name.split("_")[1])
    return report["digests"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cli("run", TINY, f"out_dir={out}", "name=A", "checkpoint.every=null")
    cli("run", TINY, f"out_dir={out}", "name=B")
    return out


def test_resume_branch_is_bitwise_equal_to_unbroken_run(runs):
    res = cli("resume", TINY, f"out_dir={runs}", "name=B", "--from", "state_20", "--name", "C")
    assert "step 40/40" in res.stdout
    a, c = runs / "A", runs / "C"
    assert sorted(p.name for p in a.glob("state_*")) == ["state_40"]
    assert digests(a / "state_40") == digests(c / "state_40")
    assert set(digests(a / "state_40")) >= {"params", "buffers", "opt", "rng", "data", "stats"}
    assert metrics(c) == metrics(a)
    assert [r["step"] for r in metrics(c)] == list(range(5, 41, 5))  # no duplicate, no orphan
    assert any("eval_loss" in r for r in metrics(a))
    manifest = orjson.loads((c / "state_40" / "manifest.json").read_bytes())
    assert manifest["parent"].endswith("B/state_20")


def test_resume_in_place_from_an_old_snapshot_explains_and_changes_nothing(runs):
    before = tree(runs / "B")
    res = cli("resume", TINY, f"out_dir={runs}", "name=B", "--from", "state_20", check=False)
    assert res.returncode == 2
    assert "not the newest snapshot" in res.stderr and "--name NEW" in res.stderr
    assert "Traceback" not in res.stderr
    assert tree(runs / "B") == before


def test_changed_recipe_is_refused_unless_allowed(tmp_path, runs):
    shutil.copytree(runs / "B", tmp_path / "B")
    (tmp_path / "B" / "state_40").rename(tmp_path / "B" / "state_40.bak")
    before = tree(tmp_path / "B")
    args = ("resume", TINY, f"out_dir={tmp_path}", "name=B", "--from", "latest", "optim.lr=0.01")
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr
    assert "optim.lr: 0.003 -> 0.01" in res.stderr and "--allow-change" in res.stderr
    assert tree(tmp_path / "B") == before
    res = cli(*args, "--allow-change", "optim.lr")
    manifest = orjson.loads((tmp_path / "B" / "state_40" / "manifest.json").read_bytes())
    assert manifest["allowed_changes"] == ["optim.lr: 0.003 -> 0.01"]
    assert [r["step"] for r in metrics(tmp_path / "B")] == list(range(5, 41, 5))


def test_run_refuses_an_existing_run(runs):
    before = tree(runs / "A")
    res = cli("run", TINY, f"out_dir={runs}", "name=A", check=False)
    assert res.returncode == 2 and "already exists" in res.stderr and "resume" in res.stderr
    assert tree(runs / "A") == before


def test_inspect_run_directory_lists_snapshots(runs):
    out = cli("inspect", runs / "B").stdout
    for step in (10, 20, 30, 40):
        assert f"{step}" in out
    assert "valid" in out


def test_corrupted_snapshot_is_named(tmp_path, runs):
    shutil.copytree(runs / "B", tmp_path / "B")
    victim = tmp_path / "B" / "state_40" / "params.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    before = tree(tmp_path / "B")
    res = cli("resume", TINY, f"out_dir={tmp_path}", "name=B", "--from", "state_40", check=False)
    assert res.returncode == 2 and "params.bin" in res.stderr and "Traceback" not in res.stderr
    res = cli("inspect", tmp_path / "B" / "state_40", check=False)
    assert res.returncode == 1 and "params.bin" in res.stdout
    assert tree(tmp_path / "B") == before


BAD_INPUT = [
    ("malformed.yaml", "name: [unclosed\n", [], "malformed.yaml"),
    ("recipe.yaml", None, ["optim.lrr=1"], "optim.lrr"),
    ("recipe.yaml", None, ["steps=ten"], "steps"),
    ("recipe.yaml", None, ["model._component_=functrain.models.Nope"], "functrain.models.Nope"),
    ("recipe.yaml", None, ["bogus=1"], "bogus"),
    ("recipe.yaml", None, ["model.block_size=16"], "do not fit together"),
    ("recipe.yaml", None, ["data.batch_size=5"], "does not split into 2 micro-batches"),
    ("recipe.yaml", None, ["model.n_head=0"], "model (functrain.models.GPT)"),
    # torch refuses the value with a RuntimeError: still the recipe's fault, named as such
    ("recipe.yaml", None, ["model.n_embd=-4"], "model (functrain.models.GPT) raised RuntimeError"),
]


@pytest.mark.parametrize("name, text, overrides, named", BAD_INPUT)
def test_bad_recipe_input_exits_2_naming_the_key(tmp_path, name, text, overrides, named):
    recipe = tmp_path / name
    recipe.write_text(text if text is not None else TINY.read_text())
    res = cli("run", recipe, f"out_dir={tmp_path / 'runs'}", *overrides, check=False)
    assert res.returncode == 2
    assert named in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_debug_env_shows_what_caused_a_user_error(tmp_path):
    args = ("run", TINY, f"out_dir={tmp_path}", "model.n_embd=-4")
    res = cli(*args, check=False, env={"FUNCTRAIN_DEBUG": "1"})
    assert res.returncode == 2 and "error: model (functrain.models.GPT)" in res.stderr
    assert "Traceback" in res.stderr and "negative dimension" in res.stderr


def test_a_bug_in_a_component_is_no_user_error_and_keeps_its_traceback(tmp_path):
    (tmp_path / "buggy.py").write_text(
        "from functrain.models import GPT\n"
        "def model(**kwargs):\n"
        "    return GPT(**kwargs).no_such_attribute\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.read_text())
    args = ("run", recipe, f"out_dir={tmp_path / 'runs'}", "model._component_=buggy.model")
    res = cli(*args, check=False, env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1, res.stderr
    assert "Traceback" in res.stderr and "AttributeError" in res.stderr
    assert "no_such_attribute" in res.stderr and "error: model" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_snapshot_is_named(tmp_path, runs):
    res = cli("resume", TINY, f"out_dir={runs}", "name=B", "--from", "state_999", check=False)
    assert res.returncode == 2 and "state_999" in res.stderr and "state_10" in res.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    assert recipe.read_text().startswith(f"# functrain run recipes/{recipe.name}")
    load_recipe(recipe)


def test_inspect_shows_lineage(tmp_path):
    """Resume points, the parent of a branch with its accepted change, and a run's branches."""
    common = (TINY, f"out_dir={tmp_path}", "name=B")
    cli("run", *common, "--until", "20")
    cli("resume", *common, "--from", "latest")
    cli("resume", *common, "--from", "state_30", "--name", "C", "optim.lr=0.01",
        "--allow-change", "optim.lr")  # fmt: skip
    b = orjson.loads(cli("inspect", tmp_path / "B", "--json").stdout)["lineage"]
    c = orjson.loads(cli("inspect", tmp_path / "C", "--json").stdout)["lineage"]
    b_dir = (tmp_path / "B").resolve()
    assert b["parent"] is None
    assert [(e["kind"], e["step"], e["from"]) for e in b["events"]] == [
        ("resume", 20, str(b_dir / "state_20"))
    ]
    assert b["branches"] == [
        {"run": str(tmp_path / "C"), "from": str(b_dir / "state_30"), "step": 30}
    ]
    assert c["parent"] == str(b_dir / "state_30") and c["branches"] == []
    assert [(e["kind"], e["step"], e["changes"]) for e in c["events"]] == [
        ("resume", 20, []),
        ("branch", 30, ["optim.lr: 0.003 -> 0.01"]),
    ]
    text = cli("inspect", tmp_path / "C").stdout
    assert f"branched from {b_dir / 'state_30'}" in text
    assert (
        f"branch  at step 30 from {b_dir / 'state_30'}; accepted: optim.lr: 0.003 -> 0.01" in text
    )
    shown = cli("inspect", tmp_path / "B").stdout
    assert f"branched off: {tmp_path / 'C'} from {b_dir / 'state_30'}" in shown
    cli("resume", TINY, f"out_dir={tmp_path}", "name=C", "optim.lr=0.01", "--from", "state_40",
        "--name", "D",
        "steps=50", "--allow-change", "steps", "--allow-change", "schedule")  # fmt: skip
    b_branches = orjson.loads(cli("inspect", tmp_path / "B", "--json").stdout)["lineage"]
    c_branches = orjson.loads(cli("inspect", tmp_path / "C", "--json").stdout)["lineage"]
    assert [x["run"] for x in b_branches["branches"]] == [str(tmp_path / "C")]  # not D
    assert [x["run"] for x in c_branches["branches"]] == [str(tmp_path / "D")]


def test_resume_with_the_runs_own_recipe_needs_no_overrides(tmp_path):
    """`resume runs/NAME/recipe.yaml`: the resolved recipe holds every override given to
    `run`; continuing with it is bitwise the unbroken run."""
    over = [f"out_dir={tmp_path}", "steps=12", "checkpoint.every=6", "log_every=6",
            "eval.every=null"]  # fmt: skip
    cli("run", TINY, *over, "name=whole")
    cli("run", TINY, *over, "--until", "6")
    cli("resume", tmp_path / "tiny" / "recipe.yaml", "--from", "latest")  # no overrides
    assert digests(tmp_path / "tiny" / "state_12") == digests(tmp_path / "whole" / "state_12")
    assert metrics(tmp_path / "tiny") == metrics(tmp_path / "whole")


def test_the_console_script_finds_components_in_the_working_directory(tmp_path):
    """`functrain run` (the installed script, not `python -m`) imports `my_models.tiny_gpt`
    from the directory it runs in, as `python -m functrain` does."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "functrain"
    assert script.is_file(), "the package is installed with its console script"
    (tmp_path / "my_models.py").write_text(
        "from functrain.models import GPT\n"
        "def tiny_gpt():\n"
        "    return GPT(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32)\n"
    )
    res = subprocess.run(
        [str(script), "run", str(TINY), "out_dir=runs", "steps=6", "checkpoint.every=null",
         "eval.every=null", "model={_component_: my_models.tiny_gpt}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "tiny" / "state_6").is_dir()
