"""Frozen parameters (`requires_grad=False`, or a recipe's `freeze:` patterns): no gradient,
no optimizer state, no weight decay, no reduction; their bytes never change, in one process,
canonical micro-batches, fp16, EMA, under torchrun; and which params are trainable is part
of the state's structure, checked on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_branch_resumes_bitwise, cli, toy_data, toy_model

import functrain as ft
from functrain import checkpoint
from functrain.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ["steps=12", "checkpoint.every=6", "eval.every=null", "log_every=6"]


def _frozen_first_layer(**kwargs) -> ft.TrainState:
    model = toy_model()
    for p in model[0].parameters():  # the first Linear
        p.requires_grad_(False)
    return ft.create(
        model,
        loss=cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),  # decay would move a frozen weight
        transforms=kwargs.pop("transforms", [ft.forward_backward(), ft.apply_optimizer()]),
        **kwargs,
    )


def _train(state: ft.TrainState, steps: int) -> ft.TrainState:
    x, y = toy_data(256)
    for i in range(steps):
        j = (i * 16) % 256
        state = ft.step(state, (x[j : j + 16], y[j : j + 16]))
    return state


def _leaves(td) -> dict:
    return {".".join(k): v for k, v in td.items(include_nested=True, leaves_only=True)}


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"transforms": [ft.forward_backward(micro_batch_size=4), ft.clip_by_global_norm(0.5),
                        ft.apply_optimizer(), ft.ema(0.9)]},
        {"precision": "fp16"},
    ],
    ids=["plain", "canonical-clip-ema", "fp16"],
)  # fmt: skip
def test_frozen_params_keep_their_bytes_and_get_no_optimizer_state(setup):
    state = _frozen_first_layer(**setup)
    frozen = {k: v.clone() for k, v in _leaves(state.frozen).items()}
    trainable = {k: v.clone() for k, v in _leaves(state.params).items()}
    assert sorted(frozen) == ["0.bias", "0.weight"] and "0.weight" not in trainable
    state = _train(state, 50)
    assert all(torch.equal(v, frozen[k]) for k, v in _leaves(state.frozen).items())
    assert any(not torch.equal(v, trainable[k]) for k, v in _leaves(state.params).items())
    opt_keys = {k for k in _leaves(state.opt) if "0.weight" in k or "0.bias" in k}
    assert not any(k.endswith(("mu.0.weight", "nu.0.weight", "mu.0.bias")) for k in opt_keys)
    assert all(not k.startswith("0.") for k in _leaves(state.ema))
    assert not any(t.requires_grad for t in _leaves(state.frozen).values())
    sd = state.state_dict()  # the module's own keys, frozen ones included
    assert list(sd) == list(toy_model().state_dict()) and torch.equal(
        sd["0.weight"], frozen["0.weight"]
    )


def test_a_model_whose_every_param_is_frozen_is_refused():
    model = toy_model()
    model.requires_grad_(False)
    with pytest.raises(ft.errors.ConfigError, match="nothing to train"):
        ft.create(model, loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2),
                  transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip


def test_a_snapshot_whose_trainable_params_differ_is_refused_by_name(tmp_path):
    state = _train(_frozen_first_layer(), 2)
    checkpoint.save(tmp_path / "state_2", state.tensors(), {"step": 2})
    tensors, _ = checkpoint.load(tmp_path / "state_2")
    everything_trainable = ft.create(
        toy_model(), loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
        transforms=[ft.forward_backward(), ft.apply_optimizer()],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"param 0\.weight is trainable now but frozen in the snapshot"
    ):
        everything_trainable.load(tensors)
    assert int(_frozen_first_layer().load(tensors).step) == 2


# ---------------------------------------------------------------- the recipe's freeze:


def test_recipe_freeze_keeps_the_matched_params_and_resumes_bitwise(tmp_path):
    freeze = "freeze=[pos.weight, 'blocks.*.ln*']"
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *SHORT, freeze, at=6, end=12)
    first, last = checkpoint.load(a / "state_6")[0], checkpoint.load(a / "state_12")[0]
    assert sorted(_leaves(last["frozen"])) == [
        "blocks.0.ln1.bias", "blocks.0.ln1.weight", "blocks.0.ln2.bias", "blocks.0.ln2.weight",
        "pos.weight",
    ]  # fmt: skip
    assert all(
        torch.equal(v, _leaves(first["frozen"])[k]) for k, v in _leaves(last["frozen"]).items()
    )
    assert not torch.equal(first["params", "tok", "weight"], last["params", "tok", "weight"])


def test_recipe_freeze_changed_on_resume_is_refused_naming_the_param(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight]", "--until", "6")
    for allow in ([], ["--allow-change", "freeze"]):  # the structure is checked first
        res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "--from", "latest", *allow,
                  check=False)  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "param pos.weight is trainable now but frozen in the snapshot" in res.stderr


def test_a_freeze_pattern_that_matches_nothing_is_refused_before_any_file(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "freeze=[encoder.*]", check=False)
    assert res.returncode == 2
    assert "freeze: 'encoder.*' matches no parameter of the model" in res.stderr
    assert "tok.weight" in res.stderr and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_frozen_params_under_torchrun_stay_as_they_were(tmp_path, monkeypatch, parallel):
    from _dist_common import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["run", TINY, f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight, tok.weight]",
            f"parallel={parallel}", "step.0.micro_batches=1", "step.0.micro_batch_size=2"]  # fmt: skip
    launch(2, *args, "name=two")
    first = checkpoint.load(tmp_path / "two" / "state_6")[0]
    last = checkpoint.load(tmp_path / "two" / "state_12")[0]
    assert sorted(_leaves(last["frozen"])) == ["pos.weight", "tok.weight"]
    assert all(
        torch.equal(v, _leaves(first["frozen"])[k]) for k, v in _leaves(last["frozen"]).items()
    )
    assert not any("tok" in k or "pos" in k for k in _leaves(last["opt"]))
    if parallel == "ddp":  # canonical and unsharded: the bits of one process
        launch(1, *args, "name=one")
        assert checkpoint.digests(tmp_path / "one" / "state_12") == checkpoint.digests(
            tmp_path / "two" / "state_12"
        )
