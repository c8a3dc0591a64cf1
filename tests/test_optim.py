"""The functional optimizers give bitwise what torch.optim gives for the same grads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_state, toy_data, toy_model
from tensordict import TensorDict

import functrain as ft
from functrain.optim import leaves


def groups(named, weight_decay: float, decayed=lambda name, p: p.ndim >= 2) -> list[dict]:
    """torch's two param groups: the decayed params with `weight_decay`, the rest without."""
    yes = [p for n, p in named if decayed(n, p)]
    no = [p for n, p in named if not decayed(n, p)]
    return [{"params": yes, "weight_decay": weight_decay}, {"params": no, "weight_decay": 0.0}]


ADAM = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7)
CASES = {  # by default weight decay skips params with ndim < 2 (biases, BatchNorm weights)
    "adamw": (
        lambda: ft.adamw(**ADAM, weight_decay=0.1),
        lambda named: torch.optim.AdamW(groups(named, 0.1), **ADAM, foreach=True),
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ),
    "adamw-decay-all": (
        lambda: ft.adamw(**ADAM, weight_decay=0.1, decay="all"),
        lambda named: torch.optim.AdamW(
            [p for _, p in named], **ADAM, weight_decay=0.1, foreach=True
        ),
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ),
    "adamw-decay-patterns": (
        lambda: ft.adamw(**ADAM, weight_decay=0.1, decay=["0.*", "*.bias"]),
        lambda named: torch.optim.AdamW(
            groups(named, 0.1, lambda n, p: n.startswith("0.") or n.endswith(".bias")),
            **ADAM,
            foreach=True,
        ),
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ),
    "sgd": (
        lambda: ft.sgd(lr=0.05),
        lambda named: torch.optim.SGD([p for _, p in named], lr=0.05, foreach=True),
        {},
    ),
    "sgd-momentum-wd": (
        lambda: ft.sgd(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-3),
        lambda named: torch.optim.SGD(
            groups(named, 1e-3), lr=0.05, momentum=0.9, dampening=0.2, foreach=True
        ),
        {"momentum": "momentum_buffer"},
    ),
    "sgd-nesterov-decay-all": (
        lambda: ft.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, decay="all"),
        lambda named: torch.optim.SGD(
            [p for _, p in named],
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-3,
            foreach=True,
        ),
        {"momentum": "momentum_buffer"},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_optim_bitwise(name):
    ours, theirs, moments = CASES[name]
    model = toy_model(dropout=0.0)
    state = make_state(model, optimizer=ours())
    ref = copy.deepcopy(model)
    opt = theirs(list(ref.named_parameters()))
    x, y = toy_data()
    for i in range(12):
        batch = (x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16])
        state = ft.step(state, batch)
        opt.zero_grad()
        F.cross_entropy(ref(batch[0]), batch[1]).backward()
        opt.step()
    for key, p in ref.named_parameters():
        path = tuple(key.split("."))
        assert torch.equal(state.params[path], p), key
        for mine, torch_name in moments.items():
            assert torch.equal(state.opt[mine][path], opt.state[p][torch_name]), (key, mine)
    for key, b in ref.named_buffers():
        assert torch.equal(state.buffers[tuple(key.split("."))], b), key


def test_opt_state_has_named_keys():
    params = make_state().params
    assert set(ft.adamw().init(params).keys()) == {"mu", "nu"}
    assert set(ft.sgd(lr=0.1, momentum=0.9).init(params).keys()) == {"momentum"}
    assert list(ft.sgd(lr=0.1).init(params).keys()) == []


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ft.adamw(lr=-1.0), "lr must be >= 0, got -1.0"),
        (lambda: ft.adamw(betas=(0.9, 1.0)), "betas must lie in [0, 1)"),
        (lambda: ft.sgd(lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: ft.sgd(lr=0.1, momentum=-0.5), "momentum must be >= 0"),
        (lambda: ft.adamw(decay="biases"), "decay must be 'matrices' (params with ndim >= 2)"),
        (lambda: ft.sgd(lr=0.1, decay=[1]), "a list of glob patterns over param names"),
    ],
)
def test_bad_hyperparameters_are_named(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)


def test_leaves_follow_the_nested_key_order():
    td = TensorDict(
        {
            "b": torch.zeros(1),
            "a": {"z": torch.ones(2), "y": {}, "x": {"w": torch.full((3,), 2.0)}},
        },
        batch_size=[],
    )
    want = list(td.values(include_nested=True, leaves_only=True))
    got = leaves(td)
    assert len(got) == len(want) == 3 and all(g is w for g, w in zip(got, want, strict=True))
    assert [tuple(t.shape) for t in got] == [(1,), (2,), (3,)]


def test_decay_masks_select_what_they_say():
    # MLP: Linear weights (2-D), biases and BatchNorm weights (1-D); ones, so decay shows
    params = make_state().params.apply(lambda t: torch.ones_like(t, requires_grad=False))
    names = [".".join(k) for k in params.keys(include_nested=True, leaves_only=True)]
    p = leaves(params)

    def decayed(**kw) -> list[str]:
        before = [t.detach().clone() for t in p]
        opt = ft.adamw(lr=0.5, weight_decay=0.5, **kw)
        zeros = params.apply(torch.zeros_like)
        opt.update(zeros, opt.init(params), params, lr=0.5, step=0)
        return [n for n, a, b in zip(names, before, p, strict=True) if not torch.equal(a, b)]

    assert decayed() == ["0.weight", "4.weight", "8.weight"]
    assert decayed(decay=["*.bias"]) == ["0.bias", "1.bias", "4.bias", "5.bias", "8.bias"]
    assert len(decayed(decay="all")) == len(names)
