"""The pure step: donation, purity, transforms, and agreement with hand-written torch loops."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_states_equal, make_state, toy_data, toy_model

import functrain as ft
from functrain import schedule
from functrain.transform import gradient_source, insert_after_gradients


def batches(n_steps: int, size: int = 16):
    x, y = toy_data()
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n_steps)]


def run(state, data, donate=True):
    losses = []
    for b in data:
        state = ft.step(state, b, donate=donate)
        losses.append(state.metrics["loss"].clone())
    return state, losses


def test_donated_state_cannot_be_used_again():
    state = make_state()
    new = ft.step(state, batches(1)[0])
    with pytest.raises(ft.ConsumedStateError, match=r"donated to step\(\).*donate=False"):
        state.params  # noqa: B018
    with pytest.raises(ft.ConsumedStateError):
        ft.step(state, batches(1)[0])
    assert int(new.step) == 1
    assert "consumed at step 0" in repr(state)


def test_state_is_immutable():
    state = make_state()
    with pytest.raises(AttributeError, match=r"immutable.*state.replace\(params=\.\.\.\)"):
        state.params = None
    with pytest.raises(AttributeError, match="has no entries"):
        state.replace(nonsense=1)
    moved = state.replace(step=torch.tensor(5))
    assert int(moved.step) == 5 and int(state.step) == 0


def test_donate_false_leaves_input_untouched_and_matches_donation():
    data = batches(6)
    start = make_state(
        transforms=[
            ft.forward_backward(),
            ft.clip_by_global_norm(0.5),
            ft.apply_optimizer(),
            ft.ema(0.9),
        ]
    )
    before = start.clone().tensors()
    pure, pure_losses = run(start, data, donate=False)
    assert_states_equal(start.tensors(), before)  # input untouched, still usable
    donated, donated_losses = run(start.clone(), data, donate=True)
    assert_states_equal(pure.tensors(), donated.tensors())
    assert all(torch.equal(a, b) for a, b in zip(pure_losses, donated_losses, strict=True))


def test_clip_accumulate_schedule_match_a_hand_written_loop():
    """AdamW + clip_grad_norm_ + 4 micro-batches + warmup-cosine, against plain torch."""
    model = toy_model(dropout=0.0)
    sched = schedule.warmup_cosine(3, 10)
    state = make_state(
        model,
        transforms=[
            ft.forward_backward(micro_batches=4),
            ft.clip_by_global_norm(0.3),
            ft.apply_optimizer(),
        ],
        schedule=sched,
    )
    ref = copy.deepcopy(model)
    decayed = [p for p in ref.parameters() if p.ndim >= 2]  # functrain's default decay mask
    others = [p for p in ref.parameters() if p.ndim < 2]
    groups = [{"params": decayed}, {"params": others, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    data = batches(10)
    for b in data:
        state = ft.step(state, b)
        opt.zero_grad()
        total = 0.0
        for x, y in zip(b[0].chunk(4), b[1].chunk(4), strict=True):
            loss = F.cross_entropy(ref(x), y) / 4
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3, foreach=True)
        opt.step()
        lr_sched.step()
        assert torch.equal(state.metrics["grad_norm"], norm)
    for key, p in ref.named_parameters():
        assert torch.equal(state.params[tuple(key.split("."))], p), key
    assert int(state.step) == 10
    assert int(state.data["samples"]) == 160


def test_metrics_are_tensors_of_the_last_step():
    state = make_state(
        transforms=[ft.forward_backward(), ft.clip_by_global_norm(1.0), ft.apply_optimizer()]
    )
    state = ft.step(state, batches(1)[0])
    for name in ("loss", "grad_norm", "lr"):
        assert isinstance(state.metrics[name], torch.Tensor)
    assert state.metrics["lr"].item() == pytest.approx(1e-2)
    assert torch.equal(state.stats["loss_ema"], state.metrics["loss"])  # first step seeds the EMA


def test_ema_tracks_params():
    state = make_state(transforms=[ft.forward_backward(), ft.apply_optimizer(), ft.ema(0.5)])
    expected = state.params.apply(lambda p: p.detach().clone())
    for b in batches(3):
        state = ft.step(state, b)
        expected = expected.apply(lambda e, p: e.lerp(p.detach(), 0.5), state.params)
    assert_states_equal(state.ema, expected)


def test_step_leaves_the_global_rng_untouched():
    state = make_state()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state = ft.step(state, batches(1)[0])
    assert torch.equal(torch.get_rng_state(), before)


def loss_at(state, k, batch):
    probe = state.clone().replace(step=torch.tensor(k))
    out = ft.forward_backward()(probe, batch)
    return out.metrics["loss"]


def test_randomness_depends_on_key_and_step_only():
    batch = batches(1, size=64)[0]
    state = make_state(seed=7)
    first = loss_at(state, 3, batch)
    torch.manual_seed(999)  # global RNG history must not matter
    torch.rand(100)
    assert torch.equal(loss_at(state, 3, batch), first)
    assert not torch.equal(loss_at(state, 4, batch), first)  # another step, other dropout masks
    assert not torch.equal(loss_at(make_state(seed=8), 3, batch), first)  # another key


def test_micro_batches_must_divide_the_batch():
    state = make_state(transforms=[ft.forward_backward(micro_batches=3), ft.apply_optimizer()])
    with pytest.raises(ValueError, match="batch of 16 samples does not split into 3 micro-batches"):
        ft.step(state, batches(1)[0])


# ---------------------------------------------------------------- transforms as (init, apply)


def test_compose_folds_inits_and_applies_in_order():
    seen = []

    def part(name):
        return ft.Transform(
            name=name,
            apply=lambda s, b: (seen.append(("apply", name)), s)[1],
            init=lambda s: (seen.append(("init", name)), s)[1],
        )

    state = make_state(transforms=[part("a"), lambda s, b: s, part("b")])
    assert seen == [("init", "a"), ("init", "b")]
    ft.step(state, (torch.randn(4, 16), torch.randint(0, 4, (4,))), donate=False)
    assert seen[2:] == [("apply", "a"), ("apply", "b")]
    assert state.static.transform.name == "compose"


def test_the_reduction_goes_after_the_declared_gradient_source_whatever_its_name():
    fb, clip, opt = ft.forward_backward(), ft.clip_by_global_norm(1.0), ft.apply_optimizer()
    renamed = attrs.evolve(fb, name="my_loss_and_grads")  # declarations, not names, count
    extra = ft.Transform(name="extra", apply=lambda s, b: s)
    names = [t.name for t in insert_after_gradients([renamed, clip, opt], [extra])]
    assert names == ["my_loss_and_grads", "extra", "clip_by_global_norm", "apply_optimizer"]
    undeclared = ft.Transform(name="forward_backward", apply=fb.apply)  # the name alone
    with pytest.raises(
        ValueError, match=r"no transform declares produces_grads.*forward_backward, clip"
    ):
        insert_after_gradients([undeclared, clip, opt], [extra])
    with pytest.raises(ValueError, match=r"more than one transform produces gradients"):
        gradient_source([fb, renamed])


def test_a_wrapped_forward_backward_keeps_its_declarations_and_its_bits():
    calls = []

    def logged(inner, state, batch):
        calls.append(int(state.step))
        return inner(state, batch)

    fb = ft.forward_backward(micro_batch_size=4)
    wrapped = fb.wrap(logged)
    assert (wrapped.name, wrapped.produces_grads, wrapped.micro_batch_size) == (
        "forward_backward", True, 4,
    )  # fmt: skip
    composed = ft.compose(wrapped, ft.apply_optimizer())
    assert composed.produces_grads and composed.micro_batch_size == 4
    data = batches(3)
    plain, _ = run(make_state(transforms=[fb, ft.apply_optimizer()]), data)
    mine, _ = run(make_state(transforms=[wrapped, ft.apply_optimizer()]), data)
    assert calls == [0, 1, 2]
    assert_states_equal(mine.tensors(), plain.tensors())


def test_a_plain_function_with_the_old_init_state_attribute_is_refused():
    def custom(state, batch):
        return state

    custom.init_state = lambda state: state
    with pytest.raises(
        TypeError, match=r"init_state.*Transform\(name=\.\.\., apply=f, init=init_state\)"
    ):
        ft.compose(custom)
