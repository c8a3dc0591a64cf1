"""Functional optimizers, optax style: a frozen pair of pure functions over TensorDicts.

    opt = optimizer.init(params)
    params, opt = optimizer.update(grads, opt, params, lr=lr, step=step)

`update` works in place on `params` and `opt` with `torch._foreach_*` kernels and returns
them; the caller decides whether those are donated buffers or fresh copies. The number of
updates done is `state.step`, passed in as `step`, so no optimizer keeps a counter of its
own. The op order copies `torch.optim.SGD` / `torch.optim.AdamW(foreach=True)` exactly, so
the same grads give bitwise the same params and moments (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from tensordict import TensorDict


def leaves(td: TensorDict) -> list[torch.Tensor]:
    """The leaf tensors of a TensorDict in its fixed key order (that of
    `td.keys(include_nested=True, leaves_only=True)`).

    A walk over each level's own values: 7x faster than `values(include_nested=True)` (11
    vs 78 us for the small GPT's 28 params), and the step takes the leaves of params,
    grads and moments several times.
    """
    out: list[torch.Tensor] = []
    for value in td.values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        else:
            out.extend(leaves(value))
    return out


def zeros_like(params: TensorDict) -> TensorDict:
    """A TensorDict of zeros shaped like `params`, with no autograd history."""
    return params.apply(lambda p: torch.zeros_like(p, requires_grad=False))


@attrs.frozen(kw_only=True)
class Optimizer:
    """`init(params) -> opt`; `update(grads, opt, params, *, lr, step) -> (params, opt)`.

    `lr` is the base learning rate; the step multiplies it by the schedule's factor.
    """

    lr: float
    init: Callable[[TensorDict], TensorDict]
    update: Callable[..., tuple[TensorDict, TensorDict]]


def _check_hparams(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def sgd(
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Optimizer:
    """Stochastic gradient descent with momentum, Nesterov and L2 weight decay.

    >>> opt = sgd(lr=0.1, momentum=0.9)
    """
    _check_hparams(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def init(params: TensorDict) -> TensorDict:
        return TensorDict({"momentum": zeros_like(params)} if momentum else {}, batch_size=[])

    @torch.no_grad()
    def update(grads, opt, params, *, lr: float, step: int):
        p, g = leaves(params), leaves(grads)
        if weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        if momentum:
            bufs = leaves(opt["momentum"])
            if step == 0:  # torch starts the buffer as a copy of the first gradient
                torch._foreach_copy_(bufs, g)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, g, alpha=1 - dampening)
            if nesterov:
                g = torch._foreach_add(g, bufs, alpha=momentum)
            else:
                g = bufs
        torch._foreach_add_(p, g, alpha=-lr)
        return params, opt

    return Optimizer(lr=lr, init=init, update=update)


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Optimizer:
    """Adam with decoupled weight decay; state `mu` (first moment) and `nu` (second).

    >>> opt = adamw(lr=3e-4, weight_decay=0.1)
    """
    beta1, beta2 = (float(b) for b in betas)
    _check_hparams(lr=lr, eps=eps, weight_decay=weight_decay)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)!r}")

    def init(params: TensorDict) -> TensorDict:
        return TensorDict({"mu": zeros_like(params), "nu": zeros_like(params)}, batch_size=[])

    @torch.no_grad()
    def update(grads, opt, params, *, lr: float, step: int):
        p, g = leaves(params), leaves(grads)
        mu, nu = leaves(opt["mu"]), leaves(opt["nu"])
        count = step + 1
        if weight_decay:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_lerp_(mu, g, 1 - beta1)
        torch._foreach_mul_(nu, beta2)
        torch._foreach_addcmul_(nu, g, g, 1 - beta2)
        # Bias corrections as Python floats from the count, exactly as torch computes them.
        step_size = (lr / (1 - beta1**count)) * -1
        bias_correction2_sqrt = (1 - beta2**count) ** 0.5
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, mu, denom, step_size)
        return params, opt

    return Optimizer(lr=lr, init=init, update=update)
