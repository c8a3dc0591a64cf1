"""Mixed precision: bf16 autocast, fp16 with dynamic loss scaling, skipped steps masked
inside the pure step, and all of it resumed bitwise."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import torch
from conftest import assert_branch_resumes_bitwise, assert_states_equal, cli, timeless_metrics

import functrain as ft
from functrain import checkpoint
from functrain.losses import next_token_cross_entropy
from functrain.models import GPT
from functrain.precision import Precision

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ("steps=12", "checkpoint.every=6", "log_every=1", "eval.every=6", "eval.batches=1")
# A scale far above what fp16 holds: the first steps overflow and are skipped, and with a
# short growth interval the scale keeps growing back into overflow, so skips recur.
SKIPPING = ("precision=fp16", "loss_scale.init=16777216", "loss_scale.growth_interval=2")


def gpt(dropout: float = 0.1) -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=dropout)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (n, 8, 17), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def state_of(precision, model=None, micro_batches: int = 2):
    return ft.create(
        model or gpt(),
        loss=next_token_cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1, decay="all"),
        transforms=[
            ft.forward_backward(micro_batches),
            ft.clip_by_global_norm(1.0),
            ft.apply_optimizer(),
        ],
        precision=precision,
        seed=3,
    )


def test_bf16_computes_in_bfloat16_and_keeps_float32_params_and_moments():
    runs = {}
    for name in ("fp32", "bf16"):
        state = state_of(name)
        losses = []
        for batch in batches(3):
            state = ft.step(state, batch)
            losses.append(state.metrics["loss"].item())
        runs[name] = state, losses
    (_, l32), (s16, l16) = runs["fp32"], runs["bf16"]
    assert l16 != l32  # autocast took effect ...
    assert max(abs(a - b) for a, b in zip(l16, l32, strict=True)) < 0.05  # ... and is close
    entries = s16.tensors()
    dtypes = {t.dtype for t in entries.select("params", "opt").values(True, True)}
    assert dtypes == {torch.float32}
    assert "loss_scale" not in entries["stats"].keys()  # noqa: SIM118 -- no loss scaler


def test_an_fp16_step_that_overflows_is_skipped_and_the_scale_backs_off():
    state = state_of(Precision("fp16", init_scale=2.0**40, growth_interval=2))
    before = state.clone().tensors()
    state = ft.step(state, batches(1)[0])
    after = state.tensors()
    for entry in ("params", "opt", "buffers"):
        assert_states_equal(after[entry], before[entry])  # the update was masked out
    stats = state.stats
    assert stats["skipped_steps"].item() == 1 and stats["loss_scale"].item() == 2.0**39
    assert int(state.step) == 1 and int(state.data["samples"]) == 8  # the batch was used
    assert torch.isfinite(state.metrics["loss"])  # the loss itself is the true one
    for batch in batches(40)[1:]:  # the scale halves until a step fits, then the params move
        state = ft.step(state, batch)
        if stats["skipped_steps"].item() < int(state.step):
            break
    assert not torch.equal(state.params["tok", "weight"], before["params", "tok", "weight"])
    assert stats["scale_growth"].item() == 1  # one finite step in a row so far


def test_fp16_is_bitwise_torch_gradscaler_with_adamw_when_no_step_overflows():
    """The same model, batches and math written with torch.amp: autocast, GradScaler,
    clip_grad_norm_(foreach=True), AdamW(foreach=True)."""
    data = batches(6)
    state = state_of(Precision("fp16", init_scale=2.0**10), gpt(dropout=0.0), micro_batches=1)
    for batch in data:
        state = ft.step(state, batch)
    assert state.stats["skipped_steps"].item() == 0  # the case this parity is about

    model = gpt(dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss_fn = next_token_cross_entropy()
    for batch in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model, batch).float()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
    ours = state.params.flatten_keys(".")
    for name, p in model.named_parameters():
        assert torch.equal(ours[name], p.detach()), name
    assert state.stats["loss_scale"].item() == scaler.get_scale()


def test_bad_precision_settings_are_refused():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Precision("fp8")
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        Precision("fp16", backoff_factor=2.0)


# ---------------------------------------------------------------- the recipe keys, end to end


@pytest.mark.parametrize("flags", [("precision=bf16",), SKIPPING], ids=["bf16", "fp16"])
def test_a_mixed_precision_run_resumed_in_a_new_process_is_bitwise(tmp_path, flags):
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *SHORT, *flags)
    if "precision=fp16" in flags:
        skipped = [r["skipped_steps"] for r in timeless_metrics(a)]
        assert skipped[5] < skipped[-1]  # steps after the resume point were skipped too
        assert skipped[-1] < 12  # and some were taken


def test_changing_precision_on_resume_is_a_listed_recipe_change(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", "name=A", *SHORT)
    resume = ("resume", TINY, f"out_dir={tmp_path}", "name=A", *SHORT, "--from", "state_6")
    res = cli(*resume, "precision=bf16", "--name", "B", check=False)
    assert res.returncode == 2 and "precision: fp32 -> bf16" in res.stderr, res.stderr
    cli(*resume, "precision=bf16", "--name", "B", "--allow-change", "precision")
    manifest = checkpoint.read_manifest(tmp_path / "B" / "state_12")
    assert "precision" in orjson.dumps(manifest).decode()
    # fp16 adds the loss scaler to the state: a snapshot without one does not fit it.
    res = cli(*resume, "precision=fp16", "--name", "C", "--allow-change", "precision", check=False)
    assert res.returncode == 2 and "stats/loss_scale" in res.stderr, res.stderr
    assert not (tmp_path / "C").exists()


def test_fp16_puts_a_skipped_update_back_one_group_of_params_at_a_time(monkeypatch):
    """fp16 keeps a copy of at most `UNDO_BYTES` of params and moments at a time to put a
    skipped update back (not a clone of the whole state per step): with a small limit the
    params fall into many groups, and the states are bitwise those of one group."""
    from functrain import steps

    def run(limit: int):
        monkeypatch.setattr(steps, "UNDO_BYTES", limit)
        state = state_of(Precision("fp16", init_scale=2.0**18, growth_interval=2))
        for batch in batches(12):  # overflows first (skipped), then backs off and trains
            state = ft.step(state, batch)
        return state

    small = state_of(Precision("fp16"))
    groups = steps._groups(small.params, small.opt, 4096)
    assert len(groups) > 3
    for names in groups:
        bytes_ = sum(
            t.numel() * t.element_size()
            for t in [*small.params.select(*names).values(True, True),
                      *steps._opt_slice(small.opt, names).values(True, True)]
        )  # fmt: skip
        assert bytes_ <= 4096 or len(names) == 1
    grouped, whole = run(4096), run(1 << 40)
    assert 0 < grouped.stats["skipped_steps"].item() < 12  # skipped, then trained
    assert_states_equal(grouped.tensors(), whole.tensors())
