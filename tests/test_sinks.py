"""Metric sinks: TensorBoard events read back with TensorBoard's own reader, cut back on
resume and inherited by a branch; W&B offline, its run id kept across a resume; a missing
extra is named before anything is written."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import orjson
import pytest
from conftest import cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from functrain.errors import RunError
from functrain.recipe import load_recipe
from functrain.run import sinks

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run / sinks.TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _metrics(run: Path, field: str) -> list[tuple[int, float]]:
    rows = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    return [(r["step"], r[field]) for r in rows if field in r]


def test_tensorboard_cut_back_on_resume_and_branched(tmp_path):
    metrics = ("metrics=[{_component_: functrain.metrics.accuracy}]", "log.train_metrics=true")
    common = (TINY, f"out_dir={tmp_path}", "name=A", "log.tensorboard=true", *metrics)
    res = cli("run", *common, "--until", "30")
    assert "| accuracy " in res.stdout and "| train_accuracy " in res.stdout  # the progress
    shutil.rmtree(tmp_path / "A" / "state_30")  # steps 25 and 30 are logged again below
    cli("resume", *common, "--from", "latest")
    cli("resume", *common, "--from", "state_20", "--name", "B")
    for run in (tmp_path / "A", tmp_path / "B"):
        loss = _scalars(run, "loss")
        assert [s for s, _ in loss] == list(range(5, 41, 5)), run  # each step once
        expected = _metrics(run, "loss")
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in expected] == loss
        assert [s for s, _ in _scalars(run, "eval_loss")] == [20, 40]
        assert _scalars(run, "eval_accuracy") == [  # every metric, as metrics.jsonl has it
            (s, pytest.approx(v, rel=1e-6)) for s, v in _metrics(run, "eval_accuracy")
        ]
        assert [s for s, _ in _scalars(run, "train_accuracy")] == list(range(5, 41, 5))
    assert len(list((tmp_path / "A" / sinks.TENSORBOARD_DIR).iterdir())) == 2  # one per process


def test_wandb_offline_keeps_its_run_id(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = (TINY, f"out_dir={tmp_path}", "name=A", "log.wandb=true",
              "metrics=[{_component_: functrain.metrics.accuracy}]")  # fmt: skip
    cli("run", *common, "--until", "20", env=env)
    first = orjson.loads((tmp_path / "A" / sinks.WANDB_FILE).read_bytes())["id"]
    (record,) = (tmp_path / "A" / "wandb").glob(f"offline-run-*{first}/*.wandb")
    assert b"eval_accuracy" in record.read_bytes()  # the recipe's metrics reach W&B
    cli("resume", *common, "--from", "latest", env=env)
    assert orjson.loads((tmp_path / "A" / sinks.WANDB_FILE).read_bytes())["id"] == first
    offline = sorted(p.name for p in (tmp_path / "A" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(first) for name in offline)
    cli("resume", *common, "--from", "state_20", "--name", "B", env=env)
    branch = orjson.loads((tmp_path / "B" / sinks.WANDB_FILE).read_bytes())["id"]
    assert branch != first
    (record,) = (tmp_path / "B" / "wandb").glob(f"offline-run-*{branch}/*.wandb")
    assert b"functrain_parent" in record.read_bytes() and first.encode() in record.read_bytes()


@pytest.mark.parametrize("extra", ["tensorboard", "wandb"])
def test_missing_extra_is_named(monkeypatch, extra):
    recipe = load_recipe(TINY, [f"log.{extra}=true"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a)
    )
    with pytest.raises(RunError, match=rf"pip install 'functrain\[{extra}\]'"):
        sinks.require(recipe)


def test_wandb_without_login_is_one_paragraph_and_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path / "home"), "WANDB_SILENT": "true"}
    out = cli("run", TINY, f"out_dir={tmp_path / 'runs'}", "log.wandb=true", env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert "log.wandb: W&B did not start" in out.stderr and "WANDB_MODE=offline" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "tiny").exists()
