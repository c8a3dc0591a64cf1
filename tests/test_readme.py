"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- tested: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no tested block {name!r}"
    return match.group(1)


def test_custom_loop_example_runs_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("custom-loop"), str(README), "exec"), {"__name__": "readme"})
    assert "loss at step 40:" in capsys.readouterr().out
    assert (tmp_path / "snapshots" / "state_40" / "manifest.json").exists()


def test_bring_your_own_model_and_data_runs_through_the_recipe_and_python(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "my_project.py").write_text(_block("byo-module"))
    (tmp_path / "byo.yaml").write_text(_yaml_block("byo-recipe"))
    res = cli("run", "byo.yaml", "out_dir=runs", cwd=tmp_path)
    assert "done: runs/byo (step 60)" in res.stdout + res.stderr
    rows = (tmp_path / "runs" / "byo" / "metrics.jsonl").read_text().splitlines()
    assert "eval_loss" in rows[-1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {"__name__": "readme"}
    exec(compile(_block("byo-python"), str(README), "exec"), namespace)
    assert "predictions:" in capsys.readouterr().out
    from functrain import checkpoint

    cli_params = checkpoint.load(tmp_path / "runs" / "byo" / "state_60")[0]["params"]
    python_params = namespace["state"].params
    for k, v in cli_params.items(include_nested=True, leaves_only=True):
        assert torch.equal(python_params[k], v), k  # one seed story: the same run
    res = cli(
        "resume", "byo.yaml", "out_dir=runs", "--from", "state_30", "--name", "again", cwd=tmp_path
    )
    runs = tmp_path / "runs"
    assert checkpoint.digests(runs / "again" / "state_60") == checkpoint.digests(
        runs / "byo" / "state_60"
    )


def _yaml_block(name: str) -> str:
    match = re.search(rf"<!-- tested: {name} -->\n```yaml\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no tested yaml block {name!r}"
    return match.group(1)
