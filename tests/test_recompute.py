"""Activation checkpointing recomputes each block in backward and changes no bit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import assert_states_equal, cli, toy_model

import functrain as ft
from functrain import checkpoint
from functrain.losses import next_token_cross_entropy
from functrain.models import GPT
from functrain.recompute import checkpoint_blocks, is_checkpointed


def gpt() -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.2)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (n, 8, 17), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(model, data, micro_batches: int = 1):
    state = ft.create(
        model,
        loss=next_token_cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
        transforms=[
            ft.forward_backward(micro_batches),
            ft.clip_by_global_norm(1.0),
            ft.apply_optimizer(),
        ],
        seed=3,
    )
    losses = []
    for batch in data:
        state = ft.step(state, batch)
        losses.append(state.metrics["loss"].item())
    return state, losses


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_checkpointed_blocks_give_the_same_bits_with_dropout(micro_batches):
    data = batches(6)
    plain, plain_losses = train(gpt(), data, micro_batches)
    model = checkpoint_blocks(gpt())
    calls = []
    for block in model.blocks:  # count passes through each block's body
        block.ln1.register_forward_pre_hook(lambda m, args: calls.append(m))
    recomputed, losses = train(model, data, micro_batches)
    assert losses == plain_losses
    assert_states_equal(recomputed.tensors(), plain.tensors())
    # each block ran twice per micro-batch: in forward, and again in backward
    assert len(calls) == 2 * len(model.blocks) * len(data) * micro_batches


def test_checkpointing_survives_a_deep_copy_and_no_grad():
    model = checkpoint_blocks(gpt())
    other = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in other.blocks)
    assert other.blocks[0].forward.__self__ is other.blocks[0]  # bound to the copy
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(other.eval()(x), gpt().eval()(x))


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="MLP has no blocks to checkpoint"):
        checkpoint_blocks(toy_model())


# ---------------------------------------------------------------- the recipe key, end to end

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ("steps=12", "checkpoint.every=6", "log_every=3", "eval.every=6")


def test_a_checkpointed_run_ends_in_the_bits_of_a_plain_one_and_resume_checks_the_key(tmp_path):
    for name, flag in (("plain", "false"), ("ac", "true")):
        args = (f"out_dir={tmp_path}", f"name={name}", f"activation_checkpointing={flag}")
        res = cli("run", TINY, *args, *SHORT, check=False)
        assert res.returncode == 0, res.stderr
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    assert checkpoint.digests(ac / "state_12") == checkpoint.digests(plain / "state_12")
    assert (ac / "metrics.jsonl").read_text().count('"step"') == 4
    res = cli(
        "resume", TINY, f"out_dir={tmp_path}", "name=ac", *SHORT, "--from", "state_6", check=False
    )
    assert res.returncode == 2
    assert "activation_checkpointing: true -> false" in res.stderr, res.stderr
