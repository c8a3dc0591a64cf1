"""The pure step and the transforms it is composed of.

A transform is a named `(init, apply)` pair (`functrain.transform`); a plain
`f(state, batch) -> state` is one too. `compose` folds a list of them into one, and `step`
runs the state's composed transform, then advances the step counter, the data cursor and
the running statistics. Nothing here reads globals, clocks or files, and nothing syncs the
host: loss, grad norm and LR stay tensors in `state.metrics`. Parallelism enters only
through the state's `Placement` and `Sharding` (`functrain.parallel`).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch.utils._pytree import tree_flatten, tree_map

from functrain import canonical, rng
from functrain.errors import ConfigError
from functrain.optim import leaves
from functrain.precision import keep_unless
from functrain.state import TrainState
from functrain.transform import Transform, compose

__all__ = [
    "advance",
    "apply_optimizer",
    "clip_by_global_norm",
    "compose",
    "ema",
    "forward_backward",
    "step",
]

_LOSS_EMA_DECAY = 0.98


def step(state: TrainState, batch: Any, *, donate: bool = True) -> TrainState:
    """Advance `state` by one optimizer update on `batch`.

    With `donate=True` (default) the returned state reuses the input's storage, updated in
    place, and the input is marked consumed. `donate=False` works on a copy and leaves the
    input bitwise untouched. Both give bitwise the same result. A donating step that raises
    marks its input consumed too (it may hold half an update): using it raises a
    ConsumedStateError that says so; with `donate=False` the input stays usable.

    >>> state = step(state, batch)                     # doctest: +SKIP
    """
    try:
        new = state.static.transform(state if donate else state.clone(), batch)
        new = advance(new, batch)
    except BaseException:
        if donate:  # part of the update may already be in its buffers: never use it again
            state.consume(failed=True)
        raise
    if donate:
        state.consume()
    return new


def _batch_size(batch: Any) -> int:
    flat, _ = tree_flatten(batch)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ConfigError("a batch must contain at least one tensor (samples along dim 0)")
    return tensors[0].shape[0]


def advance(state: TrainState, batch: Any) -> TrainState:
    """What `step` does after the transforms: count the update and the samples consumed
    (all ranks), and track the loss EMA."""
    global_batch = _batch_size(batch) * state.static.placement.world_size
    with torch.no_grad():
        loss, before = state.metrics["loss"], state.stats["loss_ema"]
        ema = torch.where(torch.isnan(before), loss, before.lerp(loss, 1 - _LOSS_EMA_DECAY))
    return state.replace(
        step=state.step + 1,
        data=state.data.replace(samples=state.data["samples"] + global_batch),
        stats=state.stats.replace(loss_ema=ema),
    )


def forward_backward(micro_batches: int = 1, *, micro_batch_size: int | None = None) -> Transform:
    """Loss and gradients of the batch, split into micro-batches accumulated in order.

    `micro_batches` cuts this process's batch into that many; randomness (dropout) is drawn
    from a seed derived from (key, step, rank), so step k's masks depend on the key and k
    only. `micro_batch_size=M` instead cuts the *global* batch into micro-batches of M
    samples, seeded by (key, step, global micro-batch index) and summed in one canonical
    tree (`functrain.canonical`), so the result has the same bits on any number of
    processes that fits. The global RNG is left as it was either way.

    The state's `Sharding` computes the gradients: with FSDP2 they come back reduce-
    scattered (this rank's shards, averaged over ranks). The state's `Precision` sets the
    dtype the loss is computed in (autocast) and, for fp16, scales the loss for backward;
    the gradients this returns are unscaled in one process; under several, the reduction
    transform that follows unscales them (after adding them: the bits do not depend on
    whether they were reduced during backward or after it).
    """
    if micro_batches < 1:
        raise ConfigError(f"micro_batches must be >= 1, got {micro_batches}")
    if micro_batch_size is not None:
        if micro_batches != 1:
            raise ConfigError("give micro_batches or micro_batch_size, not both")
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
            raise ConfigError(f"micro_batch_size must be an integer, got {micro_batch_size!r}")
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")

    def apply(state: TrainState, batch: Any) -> TrainState:
        if micro_batch_size is not None:
            return _canonical(state, batch, micro_batch_size)
        static = state.static
        n = _batch_size(batch)
        if n % micro_batches:
            raise ConfigError(
                f"batch of {n} samples does not split into {micro_batches} micro-batches"
            )
        params = leaves(state.params)
        acc: list[torch.Tensor] | None = None
        device = params[0].device
        total = torch.zeros((), device=device)
        precision = static.precision
        seed = rng.step_seed(state.rng, int(state.step), static.placement.rank)
        with rng.seeded(seed, device), state.bind() as model:
            for i in range(micro_batches):
                micro = tree_map(lambda t, i=i: _chunk(t, micro_batches, i), batch)
                with precision.autocast(device):
                    loss = static.loss(model, micro).float() / micro_batches
                scaled = precision.scale(loss, state.stats)
                last = i == micro_batches - 1  # DDP overlapped: reduced as backward runs
                acc = static.sharding.backward(scaled, params, acc, last=last)
                total = total + loss.detach()
        grads = static.sharding.gradients(state.params, acc)
        if static.placement.world_size == 1:
            precision.unscale_(grads, state.stats)  # else after the ranks' reduction
        return state.replace(
            grads=_like_params(state.params, grads),
            metrics=state.metrics.replace(loss=total),
        )

    return Transform(
        name="forward_backward",
        apply=apply,
        produces_grads=True,
        micro_batch_size=micro_batch_size,
    )


def _canonical(state: TrainState, batch: Any, size: int) -> TrainState:
    """`forward_backward(micro_batch_size=size)`: this rank's share of the global batch's
    micro-batches, summed in the canonical tree (`functrain.canonical`).

    Each micro-batch's loss is divided by the global count V, so the ranks' subtree sums
    add up to the mean, and the canonical reduction (`functrain.distributed`) adds them.
    Sharded (FSDP2) too: the sharding hands over each micro-batch's whole gradients
    unreduced (`Sharding.whole_backward`), so the bits are those of an unsharded run on any
    fitting world size. Running buffers (BatchNorm) are kept as micro-batch 0 of the global
    batch left them, which the rank holding it broadcasts.
    """
    static, placement = state.static, state.static.placement
    n = _batch_size(batch)
    if n % size:
        raise ConfigError(
            f"a batch of {n} samples per process does not split into micro-batches of "
            f"micro_batch_size={size}"
        )
    count = n // size
    canonical.check_fit(placement.world_size, n * placement.world_size, size)
    scale_by = count * placement.world_size  # V
    first = placement.rank * count  # this rank's first micro-batch, in the global batch
    device = leaves(state.params)[0].device
    precision, step_now = static.precision, int(state.step)
    tree = canonical.TreeSum(canonical.odd_part(count))  # of the gradients
    losses = canonical.TreeSum(canonical.odd_part(count))  # the same tree, of the losses
    first_buffers = None
    with state.bind() as model:
        for i, micro in enumerate(split(batch, size)):
            with rng.seeded(rng.micro_seed(state.rng, step_now, first + i), device):
                with precision.autocast(device):
                    loss = static.loss(model, micro).float() / scale_by
                losses.push([loss.detach()])
                scaled = precision.scale(loss, state.stats)
                closing = tree if i == count - 1 else None  # DDP overlapped: closes it
                grads = static.sharding.whole_backward(scaled, state.params, closing)
                if grads is not None:
                    tree.push(grads)
            if i == 0 and count > 1:
                first_buffers = [b.clone() for b in leaves(state.buffers)]
    if first_buffers:  # the running statistics as micro-batch 0 left them
        torch._foreach_copy_(leaves(state.buffers), first_buffers)
    grads, (total,) = tree.result(), losses.result()
    if placement.world_size == 1:
        precision.unscale_(grads, state.stats)  # else after the ranks' sums are added
    return state.replace(
        grads=_like_params(state.params, grads),
        metrics=state.metrics.replace(loss=total),
    )


def split(batch: Any, size: int) -> list[Any]:
    """A batch cut along dim 0 into micro-batches of `size` samples, in order."""
    count = _batch_size(batch) // size
    return [tree_map(lambda t, i=i: _chunk(t, count, i), batch) for i in range(count)]


def _chunk(leaf: Any, n: int, i: int) -> Any:
    """Micro-batch `i` of `n` of a batch leaf: tensors are cut along dim 0; anything else (a
    list of strings in a dict batch) goes to every micro-batch whole."""
    return leaf.chunk(n)[i] if isinstance(leaf, torch.Tensor) else leaf


def _like_params(params: TensorDict, values: list[torch.Tensor]) -> TensorDict:
    keys = list(params.keys(include_nested=True, leaves_only=True))
    return TensorDict(dict(zip(keys, values, strict=True)), batch_size=[])


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale the gradients so that their global L2 norm is at most `max_norm`.

    The same arithmetic as `torch.nn.utils.clip_grad_norm_(foreach=True)`, with no host sync.
    """
    if max_norm <= 0:
        raise ConfigError(f"max_norm must be > 0, got {max_norm}")

    def apply(state: TrainState, batch: Any) -> TrainState:
        grads = leaves(state.grads)
        norms = torch._foreach_norm(grads, 2.0)
        local = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        total = state.static.sharding.global_norm(local)  # sharded: combine the ranks' norms
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return state.replace(metrics=state.metrics.replace(grad_norm=total))

    return Transform(name="clip_by_global_norm", apply=apply)


def apply_optimizer() -> Transform:
    """Update params and optimizer state with the gradients at LR `optim.lr * schedule(step)`.

    A step whose gradients (on any rank) are not all finite is counted in
    `state.stats["nonfinite_steps"]`, the first one's number kept in
    `stats["first_nonfinite"]` (no host sync); under the state's `nan_policy` "skip" its
    update is masked out — as is one that would make a param non-finite (a huge LR) —
    and params and optimizer state stay as they were. With fp16's loss
    scaling an update whose gradients are not finite is masked out in any case — the loss
    scale backs off and `stats["skipped_steps"]` counts it (`functrain.precision`) — and
    only a non-finite loss counts as non-finite.
    """

    def apply(state: TrainState, batch: Any) -> TrainState:
        static = state.static
        step_now = int(state.step)
        lr = static.optimizer.lr * static.schedule(step_now)
        local = static.sharding.local_grads(state.grads)  # canonical FSDP: this rank's rows
        grads = leaves(local)
        if static.precision.scaling:  # the scaler checks the gradients; we, the loss
            skip = _nonfinite(static, grads)
            bad = _nonfinite(static, [state.metrics["loss"].reshape(1)])
            params, opt = _update(state, local, lr, step_now, skip)
            static.precision.update_(state.stats, skip)
        elif static.nan_policy == "skip":  # the gradients, or the params they would give
            bad = _nonfinite(static, grads)
            params, opt = _update(state, local, lr, step_now, bad, recheck=True)
        else:  # what changes the params: a NaN loss whose gradients are finite (a batch
            # whose targets are all -100: a mean over none) changes none, and is not counted
            bad = _nonfinite(static, grads)
            params, opt = _update(state, local, lr, step_now, None)
        with torch.no_grad():
            stats = state.stats
            stats["nonfinite_steps"].add_(bad.to(torch.int64))
            first = stats["first_nonfinite"]
            first.masked_fill_(bad.bool() & (first < 0), step_now + 1)  # as the logs number it
        metrics = state.metrics.replace(lr=torch.full_like(state.metrics["lr"], lr))
        return state.replace(params=params, opt=opt, grads=None, metrics=metrics)

    return Transform(name="apply_optimizer", apply=apply)


def _nonfinite(static: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 where any of `tensors` on any rank holds an inf or a NaN, else 0.0 (0-d, no sync)."""
    found = static.precision.nonfinite([t.detach() for t in tensors])
    return static.sharding.any_rank(found)


def _update(
    state: TrainState,
    grads: TensorDict,
    lr: float,
    step_now: int,
    skip: torch.Tensor | None,
    recheck: bool = False,
):
    """The optimizer's update with `grads` (this process's), masked out where `skip` (a 0-d
    flag, set in place) is set; with `recheck`, also where the params it gives are not
    finite."""
    static = state.static
    optimizer = static.optimizer
    if skip is None:
        return optimizer.update(grads, state.opt, state.params, lr=lr, step=step_now)
    if optimizer.elementwise and not recheck:  # a group of params at a time
        for names in _groups(state.params, state.opt, UNDO_BYTES):
            params, group = state.params.select(*names), grads.select(*names)
            opt = _opt_slice(state.opt, names)
            kept = leaves(params) + leaves(opt)
            before = [t.detach().clone() for t in kept]
            optimizer.update(group, opt, params, lr=lr, step=step_now)  # in place
            with torch.no_grad():
                keep_unless(skip.bool(), kept, before)
        return state.params, state.opt
    kept = leaves(state.params) + leaves(state.opt)
    before = [t.detach().clone() for t in kept]
    params, opt = optimizer.update(grads, state.opt, state.params, lr=lr, step=step_now)
    with torch.no_grad():
        if recheck:  # decided on the whole update: needs a copy of all of it
            torch.maximum(skip, _nonfinite(static, leaves(params)), out=skip)
        keep_unless(skip.bool(), leaves(params) + leaves(opt), before)
    return params, opt


#: Bytes of params and optimizer state an update that may be undone (fp16's skipped steps)
#: copies at a time, with an `elementwise` optimizer.
UNDO_BYTES = 64 << 20


def _opt_slice(opt: TensorDict, names: list) -> TensorDict:
    """Each entry of an elementwise optimizer's state, for the params `names` only (the
    same tensors: in place on the slice is in place on the whole)."""
    keys = list(opt.keys())
    return TensorDict({k: opt[k].select(*names) for k in keys}, batch_size=[])


def _groups(params: TensorDict, opt: TensorDict, limit: int) -> list[list]:
    """The param names in order, cut into groups whose params and optimizer slices hold at
    most `limit` bytes (a bigger param alone)."""
    groups: list[list] = [[]]
    size = 0
    entries = [opt[k] for k in opt.keys()]  # noqa: SIM118 -- a TensorDict
    for name in params.keys(include_nested=True, leaves_only=True):
        mine = [params.get(name), *(e.get(name) for e in entries)]  # the param, its moments
        n = sum(t.numel() * t.element_size() for t in mine)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def ema(decay: float = 0.999) -> Transform:
    """Keep an exponential moving average of the params in `state.ema` (saved with the state)."""
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"decay must lie in [0, 1), got {decay}")

    def init(state: TrainState) -> TrainState:
        return state.replace(ema=state.params.apply(lambda p: p.detach().clone()))

    def apply(state: TrainState, batch: Any) -> TrainState:
        with torch.no_grad():
            torch._foreach_lerp_(leaves(state.ema), leaves(state.params), 1.0 - decay)
        return state

    return Transform(name="ema", apply=apply, init=init)
