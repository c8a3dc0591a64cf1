"""Metrics beyond the loss: sums and counts over uneven batches and ranks, logged at eval;
a transform's own entries in `state.metrics`, logged and free on resume; eval in eval mode."""

from __future__ import annotations

import math
import os
from pathlib import Path

import orjson
import pytest
import torch
from conftest import assert_branch_resumes_bitwise, make_state, toy_data

import functrain as ft
from functrain.metrics import Metric, accuracy, as_metric, finish, measure, perplexity
from functrain.run.trainer import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ON_PATH = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
METRICS = ["metrics=[{_component_: functrain.metrics.accuracy}, "
           "{_component_: functrain.metrics.perplexity}]"]  # fmt: skip
SHORT = ["steps=12", "checkpoint.every=6", "eval.every=6", "eval.batches=2", "log_every=6"]


class _Fixed(torch.nn.Module):
    def forward(self, x):
        return x


def test_metrics_are_sums_over_counts_not_means_of_means():
    # Two batches of 1 and 3 samples: right 1/1 and 0/3. The mean of means is 0.5, the truth 0.25.
    one = (torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    three = (torch.tensor([[1.0, 0.0]] * 3), torch.tensor([1, 1, 1]))
    metrics = [accuracy()]
    totals = measure(metrics, _Fixed(), one) + measure(metrics, _Fixed(), three)
    assert finish(metrics, totals) == {"accuracy": 0.25}
    ignored = (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, -100]))
    assert finish(metrics, measure(metrics, _Fixed(), ignored)) == {"accuracy": 1.0}
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    (got,) = finish([perplexity()], measure([perplexity()], _Fixed(), (logits, y))).values()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1)).exp()
    assert math.isclose(got, float(want), rel_tol=1e-6)


def test_a_plain_function_is_a_metric_named_after_it():
    def positives(model, batch):
        return (batch[0] > 0).sum(), torch.tensor(batch[0].numel())

    m = as_metric(positives)
    assert isinstance(m, Metric) and m.name == "positives"
    assert finish([m], measure([m], _Fixed(), (torch.tensor([1.0, -1.0]), None))) == {
        "positives": 0.5
    }


def test_eval_runs_in_eval_mode_and_leaves_running_statistics_alone():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))  # fmt: skip
    state = make_state(model)
    x, y = toy_data(64)
    state = ft.step(state, (x[:16], y[:16]))
    before = {k: v.clone() for k, v in state.buffers.items(True, True)}
    batches = iter([(x[16:32], y[16:32]), (x[32:48], y[32:48])])
    loss, totals = evaluate(state, batches, 2, torch.device("cpu"), metrics=[accuracy()])
    assert all(torch.equal(v, before[k]) for k, v in state.buffers.items(True, True))
    batches = iter([(x[16:32], y[16:32]), (x[32:48], y[32:48])])
    again, _ = evaluate(state, batches, 2, torch.device("cpu"))
    assert torch.equal(loss, again) and totals[0, 1] == 32  # no dropout: the same each time
    assert state.static.model.training  # put back in train mode


def _records(run: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]


def test_recipe_metrics_are_logged_at_eval_and_resume_bitwise(tmp_path):
    from conftest import cli

    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *SHORT, *METRICS, at=6, end=12)
    evals = [r for r in _records(a) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        # equal eval batches: exp of the mean loss is the perplexity, to rounding
        assert math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-4)
    res = cli("run", TINY, f"out_dir={tmp_path}", "name=bad",
              "metrics=[{_component_: functrain.metrics.nope}]", check=False)  # fmt: skip
    assert res.returncode == 2 and "metrics.0._component_" in res.stderr


def test_train_metrics_are_measured_on_log_steps_batches_and_change_no_bit(tmp_path):
    from conftest import cli

    from functrain import checkpoint
    from functrain.recipe import load_recipe
    from functrain.run.build import build, to_device, train_loader
    from functrain.run.trainer import _evaluating

    args = [f"out_dir={tmp_path}", *SHORT, *METRICS, "eval.every=null"]
    cli("run", TINY, *args, "name=train", "log.train_metrics=true")
    cli("run", TINY, *args, "name=plain", "--until", "6")  # off, then on from the resume:
    cli("resume", TINY, *args, "name=plain", "log.train_metrics=true", "--from", "latest")
    plain, train = tmp_path / "plain", tmp_path / "train"  # a log key, free on resume
    assert checkpoint.digests(train / "state_12") == checkpoint.digests(plain / "state_12")
    records = _records(train)
    assert [r["step"] for r in records if "train_accuracy" in r] == [6, 12]  # log steps
    assert [r["step"] for r in _records(plain) if "train_accuracy" in r] == [12]
    # by hand: step 12's batch, the params after its update, in eval mode
    built = build(load_recipe(TINY, args))
    state, _ = checkpoint.Snapshots(train).restore("state_12", like=built.state)
    batch = to_device(next(iter(train_loader(built, start=11 * 8))), built.device)
    with _evaluating(state, built.device) as model:
        want = finish(built.metrics, measure(built.metrics, model, batch))
    assert records[-1]["train_accuracy"] == want["accuracy"]
    assert math.isclose(records[-1]["train_perplexity"], want["perplexity"], rel_tol=1e-6)


def test_eval_metrics_are_the_same_on_two_processes(tmp_path, monkeypatch):
    from _dist_common import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["run", TINY, f"out_dir={tmp_path}", *SHORT, *METRICS, "step.0.micro_batches=1",
            "step.0.micro_batch_size=2", "log.train_metrics=true"]  # fmt: skip
    launch(1, *args, "name=one")
    launch(2, *args, "name=two")
    one = [r for r in _records(tmp_path / "one") if "eval_loss" in r]
    two = [r for r in _records(tmp_path / "two") if "eval_loss" in r]
    assert [r["eval_loss"] for r in one] == [r["eval_loss"] for r in two]  # canonical: bitwise
    for a, b in zip(one, two, strict=True):  # sums over ranks: the same counts, close sums
        for split in ("eval", "train"):  # train: each rank's half of the step's batch
            assert a[f"{split}_accuracy"] == b[f"{split}_accuracy"]
            assert math.isclose(a[f"{split}_perplexity"], b[f"{split}_perplexity"], rel_tol=1e-6)


def test_a_transforms_own_metric_is_logged_and_free_on_resume(tmp_path):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["step"].insert(1, {"_component_": "_seam_components.add_batch_mean"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, recipe, *SHORT, env=ON_PATH, at=6, end=12)
    assert all("batch_mean" in r for r in _records(a))


@pytest.mark.parametrize("shift", [False, True])
def test_token_metrics_take_hf_style_labels_with_shift(shift):
    logits = torch.zeros(1, 4, 3)
    logits[0, torch.arange(4), torch.tensor([1, 2, 0, 1])] = 5.0  # predicts 1, 2, 0, 1
    ids = torch.tensor([[0, 1, 2, 0]])  # each next id is what the previous position predicts
    batch = {"input_ids": logits, "labels": ids if shift else torch.tensor([[1, 2, 0, 1]])}
    (acc,) = finish(
        [accuracy(shift=shift)], measure([accuracy(shift=shift)], _Fixed(), batch)
    ).values()
    assert acc == 1.0


def test_eval_all_counts_every_validation_sample_once_the_same_on_two_processes(
    tmp_path, monkeypatch
):
    from _dist_common import launch

    from functrain.data import text_corpus
    from functrain.models import GPT

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["run", TINY, f"out_dir={tmp_path}", *SHORT, *METRICS, "eval.batches=all",
            "step.0.micro_batches=1", "step.0.micro_batch_size=2"]  # fmt: skip
    launch(1, *args, "name=one")
    launch(2, *args, "name=two")
    one = [r for r in _records(tmp_path / "one") if "eval_loss" in r]
    two = [r for r in _records(tmp_path / "two") if "eval_loss" in r]
    assert [r["step"] for r in one] == [6, 12]
    assert [{k: v for k, v in r.items() if k.startswith("eval_")} for r in one] == [
        {k: v for k, v in r.items() if k.startswith("eval_")} for r in two
    ]  # canonical units in order: the same bits on 1 and 2 processes
    # against a hand count: every val sample once, each weighted by itself
    from functrain import checkpoint

    val = text_corpus(path=None, block_size=32, val_fraction=0.1, max_bytes=200000)["val"]
    model = GPT(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    ft.load_into(model, checkpoint.load(tmp_path / "one" / "state_12")[0])
    model.eval()
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(x)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        right = (logits.argmax(-1) == y).double().mean()
    assert math.isclose(one[-1]["eval_loss"], float(want), rel_tol=1e-5)
    assert math.isclose(one[-1]["eval_accuracy"], float(right), rel_tol=1e-9)
