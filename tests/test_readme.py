"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
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


def _sh_block(name: str) -> list[str]:
    match = re.search(rf"<!-- tested: {name} -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no tested sh block {name!r}"
    return [line.split("#")[0].split() for line in match.group(1).splitlines() if line.strip()]


def test_finetune_section_runs_as_written(tmp_path):
    """The console script (not `python -m`) finds finetune_project in the working directory;
    weights come in from save_pretrained, frozen ones stay, metrics are logged, the branch is
    bitwise, and transformers loads the export."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from functrain import checkpoint

    (tmp_path / "finetune_project.py").write_text(_block("finetune-module"))
    (tmp_path / "finetune.yaml").write_text(_yaml_block("finetune-recipe"))
    programs = {
        "python": sys.executable,
        "functrain": str(Path(sys.executable).parent / "functrain"),
    }
    for words in _sh_block("finetune-commands"):
        out = subprocess.run([programs[words[0]], *words[1:]], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
        assert out.returncode == 0, f"{words}\n{out.stdout}\n{out.stderr}"
    runs = tmp_path / "runs"
    pretrained = load_file(str(tmp_path / "pretrained" / "model.safetensors"))
    final = checkpoint.load(runs / "finetune" / "state_20")[0]
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):  # frozen: as loaded
        assert torch.equal(final["frozen"][tuple(name.split("."))], pretrained[name])
    assert not any("wte" in ".".join(k) for k in final["opt"].keys(True, True))
    moved = final["params", "transformer", "h", "0", "mlp", "c_fc", "weight"]
    assert not torch.equal(moved, pretrained["transformer.h.0.mlp.c_fc.weight"])
    rows = [
        orjson.loads(line)
        for line in (runs / "finetune" / "metrics.jsonl").read_bytes().splitlines()
    ]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_perplexity"] > 1 for r in evals)
    assert checkpoint.digests(runs / "again" / "state_20") == checkpoint.digests(
        runs / "finetune" / "state_20"
    )
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "finetuned"))
    sd = loaded.state_dict()
    for key, value in {**_flat(final["params"]), **_flat(final["frozen"])}.items():
        assert torch.equal(sd[key], value), key
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def _flat(td) -> dict:
    return {".".join(k): v for k, v in td.items(include_nested=True, leaves_only=True)}
