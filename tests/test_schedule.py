"""Schedules are pure functions of the step that follow torch's lr_scheduler values.

torch computes most schedulers recursively (each LR from the previous one), we compute the
closed form, so the two agree to float rounding (rel 1e-9), not bitwise; within functrain
the LR is a pure function of the step, which is what makes resume exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as S

from functrain import schedule

BASE = 0.1


def torch_lrs(make, steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


CASES = {
    "constant": (schedule.constant(), lambda o: S.ConstantLR(o, factor=1.0, total_iters=0)),
    "linear_warmup": (
        schedule.linear_warmup(10, start_factor=0.1),
        lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
    ),
    "cosine": (
        schedule.cosine(30, final=0.1),
        lambda o: S.CosineAnnealingLR(o, T_max=30, eta_min=BASE * 0.1),
    ),
    "linear_decay": (
        schedule.linear_decay(30, final=0.2),
        lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=30),
    ),
    "warmup_cosine": (
        schedule.warmup_cosine(5, 30, start_factor=0.2),
        lambda o: S.SequentialLR(
            o,
            [
                S.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=5),
                S.CosineAnnealingLR(o, T_max=25, eta_min=0.0),
            ],
            milestones=[5],
        ),
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_lr_scheduler(name):
    ours, make = CASES[name]
    expected = torch_lrs(make, 31)  # torch cosine restarts past T_max; ours holds
    got = [BASE * ours(s) for s in range(31)]
    for s, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15), (s, a, b)


def test_schedule_is_pure_function_of_step():
    f = schedule.warmup_cosine(10, 100)
    forward = [f(s) for s in range(100)]
    backward = [f(s) for s in reversed(range(100))][::-1]
    assert forward == backward
    assert f(0) == 0.0 and f(10) == 1.0 and f(100) == 0.0 and f(1000) == 0.0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schedule.cosine(0), "total_steps must be > 0, got 0"),
        (lambda: schedule.linear_warmup(-5), "warmup_steps must be >= 0, got -5"),
        (lambda: schedule.warmup_cosine(100, 50), "total_steps must be > warmup_steps"),
    ],
)
def test_bad_arguments_are_named(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)
