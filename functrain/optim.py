"""Functional optimizers, optax style: a frozen pair of pure functions over TensorDicts.

    opt = optimizer.init(params)
    params, opt = optimizer.update(grads, opt, params, lr=lr, step=step)

`update` works in place on `params` and `opt` with `torch._foreach_*` kernels and returns
them; the caller decides whether those are donated buffers or fresh copies. The number of
updates done is `state.step`, passed in as `step`, so no optimizer keeps a counter of its
own. The op order copies `torch.optim.SGD` / `torch.optim.AdamW(foreach=True)` exactly, so
the same grads give bitwise the same params and moments (tested).

Weight decay applies to the params `decay` selects: by default those with `ndim >= 2`
(weight matrices and embeddings; biases and norm weights are left alone, as nanoGPT and
optax's `mask` do), `"all"`, or a list of glob patterns over the param names
(`named_parameters()` style, e.g. `["blocks.*.weight"]`). That is torch's two param groups,
one with the weight decay and one without, and gives the same bits (tested).
"""

from __future__ import annotations

import fnmatch
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
    `elementwise`: `update` works in place, each param with its own slice of every `opt`
    entry (`opt[name]` holds a TensorDict keyed like the params) and nothing summed across
    params, so it gives the same bits on any subset of the params: a step that may have to
    undo it (fp16's skipped steps) then keeps a copy of one group of params at a time, not
    of the whole state. sgd and adamw are.
    """

    lr: float
    init: Callable[[TensorDict], TensorDict]
    update: Callable[..., tuple[TensorDict, TensorDict]]
    elementwise: bool = False


Decay = str | list[str]


def _decay_mask(decay: Decay) -> Callable[[TensorDict], list[bool]]:
    """Which leaves of the params (in `leaves` order) weight decay applies to."""
    if decay == "matrices":
        return lambda params: [p.ndim >= 2 for p in leaves(params)]
    if decay == "all":
        return lambda params: [True] * len(leaves(params))
    if isinstance(decay, str) or not all(isinstance(x, str) for x in decay):
        raise ValueError(
            f"decay must be 'matrices' (params with ndim >= 2), 'all', or a list of glob "
            f"patterns over param names, got {decay!r}"
        )
    patterns = list(decay)

    def mask(params: TensorDict) -> list[bool]:
        names = [".".join(k) for k in params.keys(include_nested=True, leaves_only=True)]
        return [any(fnmatch.fnmatchcase(n, pat) for pat in patterns) for n in names]

    return mask


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
    decay: Decay = "matrices",
) -> Optimizer:
    """Stochastic gradient descent with momentum, Nesterov and L2 weight decay (on the
    params `decay` selects, module docstring).

    >>> opt = sgd(lr=0.1, momentum=0.9)
    """
    _check_hparams(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    decayed = _decay_mask(decay)

    def init(params: TensorDict) -> TensorDict:
        return TensorDict({"momentum": zeros_like(params)} if momentum else {}, batch_size=[])

    @torch.no_grad()
    def update(grads, opt, params, *, lr: float, step: int):
        p, g = leaves(params), leaves(grads)
        if weight_decay:
            g = _add_decay(g, p, decayed(params), weight_decay)
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

    return Optimizer(lr=lr, init=init, update=update, elementwise=True)


def _add_decay(
    g: list[torch.Tensor], p: list[torch.Tensor], mask: list[bool], weight_decay: float
) -> list[torch.Tensor]:
    """`g + weight_decay * p` where `mask` says so, `g` elsewhere (new tensors, as torch's)."""
    which = [i for i, m in enumerate(mask) if m]
    out = list(g)
    added = torch._foreach_add([g[i] for i in which], [p[i] for i in which], alpha=weight_decay)
    for i, t in zip(which, added, strict=True):
        out[i] = t
    return out


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    decay: Decay = "matrices",
) -> Optimizer:
    """Adam with decoupled weight decay (on the params `decay` selects, module docstring);
    state `mu` (first moment) and `nu` (second).

    >>> opt = adamw(lr=3e-4, weight_decay=0.1)
    """
    beta1, beta2 = (float(b) for b in betas)
    _check_hparams(lr=lr, eps=eps, weight_decay=weight_decay)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)!r}")
    decayed = _decay_mask(decay)

    def init(params: TensorDict) -> TensorDict:
        return TensorDict({"mu": zeros_like(params), "nu": zeros_like(params)}, batch_size=[])

    @torch.no_grad()
    def update(grads, opt, params, *, lr: float, step: int):
        p, g = leaves(params), leaves(grads)
        mu, nu = leaves(opt["mu"]), leaves(opt["nu"])
        count = step + 1
        if weight_decay:
            which = [t for t, m in zip(p, decayed(params), strict=True) if m]
            if which:
                torch._foreach_mul_(which, 1 - lr * weight_decay)
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

    return Optimizer(lr=lr, init=init, update=update, elementwise=True)
