"""What a user trips over (issue 14): stopping at a step, the LR as used."""

from __future__ import annotations

import copy
from pathlib import Path

import orjson
import pytest
import torch
from conftest import Tied, cli, timeless_metrics

import functrain as ft
from functrain import checkpoint
from functrain.losses import cross_entropy
from functrain.models import MLP
from functrain.rng import seeded
from functrain.schedule import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ("steps=12", "checkpoint.every=null", "log_every=1", "eval.every=null")


def test_until_stops_after_the_step_with_a_snapshot_and_resume_finishes_bitwise(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", "name=A", *SHORT)
    res = cli("run", TINY, f"out_dir={tmp_path}", "name=B", *SHORT, "--until", "5")
    assert res.returncode == 0
    assert "stopped after step 5 (--until)" in res.stdout + res.stderr
    said = res.stdout + res.stderr
    assert f"functrain resume {TINY} out_dir={tmp_path} name=B " in said and "--from latest" in said
    b = tmp_path / "B"
    assert [s for s, _ in checkpoint.list_snapshots(b)] == [5]
    res = cli("resume", TINY, f"out_dir={tmp_path}", "name=B", *SHORT, "--from", "latest",
              "--until", "9")  # fmt: skip
    assert [s for s, _ in checkpoint.list_snapshots(b)] == [5, 9]
    cli("resume", TINY, f"out_dir={tmp_path}", "name=B", *SHORT, "--from", "latest")
    a = tmp_path / "A"
    assert checkpoint.digests(b / "state_12") == checkpoint.digests(a / "state_12")
    assert timeless_metrics(b) == timeless_metrics(a)


def test_an_until_outside_the_run_is_refused_before_anything_is_written(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "--until", "13", check=False)
    assert res.returncode == 2 and "--until 13: give a step > 0 and at most" in res.stderr
    assert not (tmp_path / "tiny").exists()
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "--until", "6")
    before = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "--from", "latest",
              "--until", "6", "--name", "C", check=False)  # fmt: skip
    assert res.returncode == 2 and "after the snapshot's (6)" in res.stderr, res.stderr
    assert not (tmp_path / "C").exists()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == before


def test_the_logged_lr_is_the_lr_the_optimizer_used(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT)
    schedule = warmup_cosine(warmup_steps=5, total_steps=12)  # the tiny recipe's
    for row in timeless_metrics(tmp_path / "tiny"):
        assert row["lr"] == 3.0e-3 * schedule(row["step"] - 1)  # exactly, not to float32
    state = ft.create(
        MLP(in_features=4, hidden=8, classes=2),
        loss=cross_entropy(),
        optimizer=ft.sgd(lr=0.1),
        schedule=schedule,
        transforms=[ft.forward_backward(), ft.apply_optimizer()],
    )
    for _ in range(3):
        state = ft.step(state, (torch.randn(4, 4), torch.tensor([0, 1, 0, 1])))
    assert state.metrics["lr"].dtype == torch.float64
    assert state.metrics["lr"].item() == 0.1 * schedule(2)


def test_warmup_cosine_is_bitwise_the_transformers_formula():
    """transformers' get_cosine_schedule_with_warmup, its lambda written out (num_cycles 0.5)."""
    import math

    def hf(step: int, warmup: int, total: int, num_cycles: float = 0.5) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    for warmup, total in ((0, 10), (5, 40), (100, 1000), (7, 333)):
        schedule = warmup_cosine(warmup_steps=warmup, total_steps=total)
        assert all(schedule(s) == hf(s, warmup, total) for s in range(total + 1))


def test_the_trace_records_the_dataset_index_of_every_sample(tmp_path):
    from torch.utils.data import default_collate

    from functrain.distributed.trace import sample_digests
    from functrain.recipe import instantiate, load_recipe

    cli("run", TINY, f"out_dir={tmp_path}", "steps=6", "checkpoint.every=null", "eval.every=null",
        env={"FUNCTRAIN_TRACE": str(tmp_path / "trace")})  # fmt: skip
    lines = (tmp_path / "trace" / "rank0.jsonl").read_bytes().splitlines()
    records = [orjson.loads(line) for line in lines[1:]]
    assert [r["samples"] for r in records] == [0, 8, 16, 24, 32, 40]
    train = instantiate(load_recipe(TINY).data.dataset)["train"]
    for r in records:
        assert len(r["indices"]) == 8 and len(set(r["indices"])) == 8
        assert [sample_digests(default_collate([train[i]]))[0] for i in r["indices"]] == r["rows"]


# ---------------------------------------------------------------- the Python API


def _mlp():
    with seeded(0):
        return MLP(in_features=4, hidden=8, classes=2, dropout=0.0)


def _mlp_state(loss=None, transforms=None):
    return ft.create(
        _mlp(),
        loss=loss or cross_entropy(),
        optimizer=ft.adamw(lr=0.1),
        transforms=transforms or [ft.forward_backward(), ft.apply_optimizer()],
    )


def _dict_batch(keys=("x", "y")):
    g = torch.Generator().manual_seed(0)
    return {
        keys[0]: torch.randn(8, 4, generator=g),
        keys[1]: torch.arange(8) % 2,
        "idx": torch.arange(8),
    }


def test_losses_take_pairs_and_mappings_with_named_or_common_fields():
    pair = _dict_batch()
    a = ft.step(_mlp_state(), (pair["x"], pair["y"]))
    b = ft.step(_mlp_state(), pair)  # x / y found by name
    c = ft.step(
        _mlp_state(cross_entropy(input="feats", target="label")), _dict_batch(("feats", "label"))
    )
    d = ft.step(_mlp_state(), _dict_batch(("input_ids", "labels")))
    for s in (b, c, d):
        assert torch.equal(s.metrics["loss"], a.metrics["loss"])
    with pytest.raises(
        TypeError, match=r"the batch is dict \{feats: Tensor\[8, 4\] float32.*no input field"
    ):
        ft.step(_mlp_state(), _dict_batch(("feats", "label")))
    with pytest.raises(TypeError, match=r"takes a batch \(x, y\) or a mapping.*tuple of 3"):
        ft.step(_mlp_state(), (pair["x"], pair["y"], pair["idx"]))


def test_a_bad_batch_shape_is_refused_before_training_naming_its_structure(tmp_path):
    """A dataset of bare tensors (no target): the trial step names the batch's structure."""
    import os

    tests = str(Path(__file__).resolve().parent)
    data = "data.dataset={_component_: _streams.sharded_tokens, block_size: 0, sizes: [40]}"
    res = cli("run", TINY, f"out_dir={tmp_path}", *SHORT, data, check=False,
              env={"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])})  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "next_token_cross_entropy takes a batch (x, y) or a mapping" in res.stderr
    assert "the batch is Tensor[4] int64" in res.stderr  # a micro-batch: tiny has 2
    assert not (tmp_path / "tiny").exists()


def test_state_dict_and_load_into_give_the_plain_module_its_trained_weights(tmp_path):
    state = _mlp_state(transforms=[ft.forward_backward(), ft.apply_optimizer(), ft.ema(0.5)])
    for _ in range(3):
        state = ft.step(state, _dict_batch())
    fresh = MLP(in_features=4, hidden=8, classes=2, dropout=0.0)
    assert list(state.state_dict()) == list(fresh.state_dict())  # keys and their order
    ft.load_into(fresh, state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state.state_dict()[k]), k
    ema = ft.load_into(MLP(in_features=4, hidden=8, classes=2, dropout=0.0), state, ema=True)
    w = next(k for k in fresh.state_dict() if k.endswith("weight"))
    assert not torch.equal(ema.state_dict()[w], fresh.state_dict()[w])
    checkpoint.save(tmp_path / "state_3", state.tensors(), {"step": 3})
    again = ft.load_into(
        MLP(in_features=4, hidden=8, classes=2, dropout=0.0),
        checkpoint.load(tmp_path / "state_3")[0],
    )
    assert all(torch.equal(again.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_create_takes_the_module_over_and_says_so_when_it_is_used():
    model = MLP(in_features=4, hidden=8, classes=2, dropout=0.0)
    state = ft.create(model, loss=cross_entropy(), optimizer=ft.sgd(lr=0.1),
                      transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip
    with pytest.raises(RuntimeError, match="taken over by functrain.create"):
        model(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"state.state_dict\(\)"):
        model.state_dict()
    with state.bind() as bound:  # the supported way
        assert bound(torch.zeros(2, 4)).shape == (2, 2)


def test_restore_makes_the_resume_checks_for_a_custom_loop(tmp_path, capsys):
    from torch.utils.data import TensorDataset

    from functrain.data import fingerprint
    from functrain.errors import RunError

    data = TensorDataset(torch.randn(64, 4), torch.arange(64) % 2)
    fp = fingerprint(data, batch_size=8, shuffle=True, seed=0)
    with checkpoint.Snapshots(tmp_path, meta={"data": fp}) as snapshots:
        snapshots.maybe_save(ft.step(_mlp_state(), _dict_batch()), last=True)
    other = fingerprint(data, batch_size=16, shuffle=True, seed=0)
    with pytest.raises(RunError, match="global batch size 8 -> 16"):
        checkpoint.Snapshots(tmp_path).restore("latest", like=_mlp_state(), expect={"data": other})
    state, path = checkpoint.Snapshots(tmp_path).restore(
        "latest", like=_mlp_state(), expect={"data": fp}
    )
    assert int(state.step) == 1 and path.name == "state_1"


def test_version_and_a_help_written_for_users():
    assert cli("--version").stdout.strip() == f"functrain {checkpoint.versions()['functrain']}"
    text = cli("--help").stdout
    assert "resume it exactly" in text and "parse, build" not in text


def test_export_writes_safetensors_that_load_into_the_plain_module(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from functrain.models import GPT

    steps = "step=[{_component_: functrain.steps.forward_backward}, "
    steps += "{_component_: functrain.steps.apply_optimizer}, {_component_: functrain.steps.ema}]"
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, steps)
    snap = tmp_path / "tiny" / "state_12"
    out = tmp_path / "model.safetensors"
    res = cli("export", snap, "--out", out)
    assert "wrote" in res.stderr and out.exists()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    args = orjson.loads(meta["model"])
    assert args.pop("_component_") == "functrain.models.GPT" and meta["step"] == "12"
    model = GPT(**args)
    model.load_state_dict(load_file(str(out)))  # no functrain in the loop
    want = ft.load_into(GPT(**args), checkpoint.load(snap)[0])
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in model.state_dict().items())
    ema_out = tmp_path / "ema.safetensors"
    cli("export", snap, "--out", ema_out, "--ema")
    assert not torch.equal(load_file(str(ema_out))["tok.weight"], load_file(str(out))["tok.weight"])
    res = cli("export", snap, "--out", out, check=False)  # never overwrites
    assert res.returncode == 2 and "already exists" in res.stderr


def test_export_names_the_extra_when_safetensors_is_missing(tmp_path, monkeypatch):
    import sys

    from functrain.cli.export import export
    from functrain.errors import RunError

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(RunError, match=r"pip install 'functrain\[safetensors\]'"):
        export(tmp_path / "state_1", tmp_path / "m.safetensors")


def test_sample_gives_text_from_a_snapshot_the_same_for_a_seed(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT)
    snap = tmp_path / "tiny" / "state_12"
    args = ("sample", snap, "--prompt", "def ", "--tokens", "40")
    a, b = cli(*args, "--seed", "1").stdout, cli(*args, "--seed", "1").stdout
    c = cli(*args, "--seed", "2").stdout
    assert a == b and a.startswith("def ") and len(a.encode()) >= 40
    assert a != c  # another seed, other text
    greedy = cli(*args, "--temperature", "0", "--seed", "1").stdout
    assert greedy == cli(*args, "--temperature", "0", "--seed", "2").stdout  # no draw at all
    res = cli("sample", tmp_path / "nope", check=False)
    assert res.returncode == 2 and "nope" in res.stderr


def test_tied_weights_come_back_under_every_name():
    with seeded(0):
        model = Tied(10, 4)
    plain = copy.deepcopy(model)
    state = ft.create(model, loss=cross_entropy(), optimizer=ft.sgd(lr=0.1),
                      transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip
    batch = (torch.arange(8), torch.arange(8))
    state = ft.step(state, batch)
    loss = torch.nn.functional.cross_entropy(plain(batch[0]), batch[1])
    loss.backward()  # the same step in plain torch: one tensor, both uses' gradients
    with torch.no_grad():
        plain.emb.weight.sub_(0.1 * plain.emb.weight.grad)
    assert torch.equal(state.metrics["loss"], loss.detach())
    assert torch.equal(state.params["emb", "weight"], plain.emb.weight)
    sd = state.state_dict()
    assert list(sd) == ["emb.weight", "head.weight"] and sd["emb.weight"] is sd["head.weight"]
    fresh = ft.load_into(Tied(10, 4), state)
    assert (
        torch.equal(fresh.head.weight, sd["emb.weight"]) and fresh.head.weight is fresh.emb.weight
    )


def test_a_dict_batch_may_carry_fields_that_are_not_tensors():
    batch = {**_dict_batch(), "text": ["a sample"] * 8}
    state = _mlp_state(transforms=[ft.forward_backward(2), ft.apply_optimizer()])
    assert torch.isfinite(ft.step(state, batch).metrics["loss"])
