"""Reducing gradients over data-parallel ranks inside the step.

With `parallel: ddp` every rank holds the whole state and the ranks' gradients are
averaged (in order) or added in the canonical tree (canonical micro-batches), so every rank
applies the same update: during the step's last backward, bucket by bucket (`Overlapped`,
the default), or after it by a transform placed right after `forward_backward`
(`all_reduce_grads`, `tree_reduce_grads`), which also reduces the loss, unscales (fp16) and
broadcasts rank 0's buffers. With `parallel: fsdp` backward reduce-scatters the gradients
(only the loss and buffers go through the transform), or, canonical, the tree transform
adds whole gradients as under ddp."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as td
from tensordict import TensorDict

from functrain.canonical import TreeSum
from functrain.optim import leaves
from functrain.parallel import Placement, Unsharded, check_scalar, check_used
from functrain.state import TrainState
from functrain.transform import Transform

__all__ = ["Overlapped", "all_reduce_grads", "transforms", "tree_reduce_grads"]

_BUCKET_BYTES = 25 << 20

# torch 2.13 renamed all_gather_into_tensor (which now warns at every call)
_all_gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor


def transforms(
    placement: Placement, sharded: bool = False, *, canonical: bool = False
) -> list[Transform]:
    """The transforms a distributed step needs right after `forward_backward` (none for one
    process). `canonical` (`forward_backward(micro_batch_size=)`): the ranks' subtree sums
    of whole gradients are added in the canonical tree, sharded (FSDP2) or not. Otherwise
    sharded, gradients are already reduce-scattered: only the loss is averaged and the
    buffers broadcast. Gradients an `Overlapped` sharding reduced during this step's
    backward are not reduced again (`_reduced_in_backward`)."""
    if placement.world_size == 1:
        return []
    if canonical:
        return [tree_reduce_grads()]
    return [all_reduce_grads(grads=not sharded)]


class Overlapped(Unsharded):
    """The replicated state of `parallel: ddp`, its gradients reduced while backward runs.

    On the step's last backward a hook on each param takes its gradient as autograd makes
    it, finishes it (adds the earlier micro-batches' sum, or closes the canonical tree
    for it) and copies it into its bucket: params in reverse order (the order backward
    reaches them), grouped by dtype into flat buckets of about `bucket_bytes`. A full
    bucket starts its collective at once, without waiting: an all-reduce, or the canonical
    tree's all-to-all (`_tree_start`), whose all-gather follows after backward. So the
    communication of the last layers runs while backward computes the first, as DDP's
    buckets do, and the bits are those of the reduction after backward: the same additions
    of the same values (canonical: any bucketing; in-order: all-reduce bits follow the
    bucket's size and offset, which are fixed, so N -> N stays bitwise).

    Every rank must run the same graph (the buckets fill in the order backward reaches
    them), as with DDP.
    """

    def __init__(self, world_size: int, bucket_bytes: int = _BUCKET_BYTES) -> None:
        self.world_size, self.bucket_bytes = world_size, max(1, bucket_bytes)
        self.reduced = False  # set by a backward that reduced, cleared by the transform

    def take_reduced(self) -> bool:
        """Whether this step's backward reduced the gradients (a transform of the user's
        that made them itself leaves them to the reduction transform); clears it."""
        reduced, self.reduced = self.reduced, False
        return reduced

    def backward(
        self,
        loss: torch.Tensor,
        params: list[torch.Tensor],
        acc: list[torch.Tensor] | None,
        last: bool = False,
    ) -> list[torch.Tensor]:
        if not last:
            return super().backward(loss, params, acc)

        def final(i: int, grad: torch.Tensor) -> torch.Tensor:
            return grad if acc is None else acc[i].add_(grad)

        def start(flat: torch.Tensor):
            return td.all_reduce(flat, op=td.ReduceOp.SUM, async_op=True)

        def end(flats: list[torch.Tensor], works: list) -> None:
            for flat, work in zip(flats, works, strict=True):
                work.wait()
                flat /= self.world_size

        return self._during_backward(loss, params, final, start, end)

    def whole_backward(
        self, loss: torch.Tensor, params: TensorDict, tree: TreeSum | None = None
    ) -> list[torch.Tensor] | None:
        if tree is None:
            return super().whole_backward(loss, params)
        if not tree.closes():
            raise ValueError("whole_backward was given a tree this micro-batch does not close")
        world, rank = self.world_size, td.get_rank()

        def end(flats: list[torch.Tensor], works: list) -> None:
            gathers = [_tree_middle(work, world, rank) for work in works]  # all started
            for flat, gather in zip(flats, gathers, strict=True):
                _tree_end(flat, gather)

        grads = self._during_backward(
            loss, leaves(params), tree.close, lambda flat: _tree_start(flat, world, rank), end
        )
        tree.closed(grads)
        return None

    def _during_backward(self, loss, params, final, start, end) -> list[torch.Tensor]:
        """Backward of `loss`, each param's gradient `final(i, grad)` copied into its bucket
        as it comes and each full bucket's collective `start`ed; after backward, `end`
        (the flat buckets, their works). Returns views of the buckets, one per param."""
        check_scalar(loss)
        plan, where = slots(params, self.bucket_bytes)
        flats = [
            torch.empty(sum(params[i].numel() for i in bucket), dtype=params[bucket[0]].dtype,
                        device=params[bucket[0]].device)
            for bucket in plan
        ]  # fmt: skip
        views = [
            flats[b][o : o + p.numel()].view_as(p) for p, (b, o) in zip(params, where, strict=True)
        ]
        missing = [len(bucket) for bucket in plan]
        works: list = [None] * len(plan)
        started: list[int] = []

        def hook(i: int):
            def on_grad(grad: torch.Tensor) -> torch.Tensor:
                b = where[i][0]
                views[i].copy_(final(i, grad))
                missing[b] -= 1
                if missing[b] == 0:
                    works[b] = start(flats[b])
                    started.append(b)
                return views[i]  # what autograd hands back: no second copy held

            return on_grad

        handles = [p.register_hook(hook(i)) for i, p in enumerate(params)]
        try:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        check_used(grads)
        del grads
        end([flats[b] for b in started], [works[b] for b in started])
        self.reduced = True
        return views


def all_reduce_grads(bucket_bytes: int = _BUCKET_BYTES, *, grads: bool = True) -> Transform:
    """Average gradients (and the loss) over ranks; broadcast rank 0's buffers, as DDP does.

    Tensors are grouped by dtype into flat buckets of about `bucket_bytes`: one `cat`, one
    all-reduce and one split-copy per bucket. The loss rides in the last float32 bucket, so
    a float32 model costs one collective per step (plus one per buffer dtype). Every rank
    then applies the same update to the same params, so the replicas stay equal.

    With `grads=False` (FSDP2, whose backward already reduce-scattered them) only the loss
    is averaged and the buffers broadcast.
    """

    def apply(state: TrainState, batch: Any) -> TrainState:
        world = state.static.placement.world_size
        loss = state.metrics["loss"].detach().clone()
        grad_leaves = leaves(state.grads)
        with_grads = grads and not _reduced_in_backward(state)
        for bucket in _buckets([*grad_leaves, loss] if with_grads else [loss], bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            td.all_reduce(flat, op=td.ReduceOp.SUM)
            flat /= world
            _scatter(flat, bucket)
        state.static.precision.unscale_(grad_leaves, state.stats)  # after: as in one process
        _broadcast_buffers(state, bucket_bytes)
        return state.replace(metrics=state.metrics.replace(loss=loss))

    return Transform(name="all_reduce_grads", apply=apply)


def tree_reduce_grads(bucket_bytes: int = _BUCKET_BYTES) -> Transform:
    """Add the ranks' canonical subtree sums of gradients and loss (`functrain.canonical`)
    in the canonical tree, siblings first; unscale (fp16); broadcast rank 0's buffers.

    Per flat bucket, two collectives (`_tree_sum`): an all-to-all hands each rank 1/N of
    every rank's bucket, which it adds in the tree over ranks, and an all-gather puts the
    sums together: 2 (N - 1) / N of the bucket sent per rank, as a ring all-reduce sends,
    and the same bits on every rank and on any power-of-two N. Under FSDP2 the gradients
    stay whole on every rank, so clipping sees the norm an unsharded run sees, and the
    optimizer takes this rank's rows (`Sharding.local_grads`). Gradients `Overlapped`
    reduced during backward are left as they are: only the loss goes through the tree.
    """

    def apply(state: TrainState, batch: Any) -> TrainState:
        placement = state.static.placement
        world, rank = placement.world_size, placement.rank
        if world & (world - 1):
            raise ValueError(
                f"the canonical reduction needs a power-of-two world size, got {world}"
            )
        loss = state.metrics["loss"].detach().clone()
        grad_leaves = leaves(state.grads)
        with_grads = not _reduced_in_backward(state)
        for bucket in _buckets([*grad_leaves, loss] if with_grads else [loss], bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            _tree_sum(flat, world, rank)
            _scatter(flat, bucket)
        state.static.precision.unscale_(grad_leaves, state.stats)
        _broadcast_buffers(state, bucket_bytes)
        return state.replace(metrics=state.metrics.replace(loss=loss))

    return Transform(name="tree_reduce_grads", apply=apply)


def _tree_sum(flat: torch.Tensor, world: int, rank: int) -> None:
    """`flat` becomes, on every rank, the sum over ranks in the tree pairing siblings first.

    Two collectives, whatever N: an all-to-all gives rank j piece j of every rank's `flat`,
    rank j adds those N pieces in the tree over ranks ((0 + 1) + (2 + 3)) + ..., and an
    all-gather puts the N sums back together. Every addition pairs the same two values the
    tree does (IEEE addition is commutative), so the bits are those of one process.
    """
    _tree_end(flat, _tree_middle(_tree_start(flat, world, rank), world, rank))


def _tree_start(flat: torch.Tensor, world: int, rank: int):
    """Start the all-to-all of `_tree_sum`: rank j will hold piece j of every rank's `flat`."""
    sizes = [c.numel() for c in torch.tensor_split(flat, world)]
    got = torch.empty(world * sizes[rank], dtype=flat.dtype, device=flat.device)
    work = td.all_to_all_single(
        got, flat, output_split_sizes=[sizes[rank]] * world, input_split_sizes=sizes,
        async_op=True,
    )  # fmt: skip
    return work, got, sizes


def _tree_middle(started, world: int, rank: int):
    """Add this rank's pieces in the tree over ranks; start the all-gather of the sums."""
    work, got, sizes = started
    work.wait()
    parts = list(got.view(world, sizes[rank]))  # part i: rank i's piece `rank`
    while len(parts) > 1:  # siblings first: (0 + 1), (2 + 3), then their sums
        parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    width = max(sizes)  # all-gather wants equal sizes: pieces differ by at most one
    mine = torch.zeros(width, dtype=got.dtype, device=got.device)
    mine[: sizes[rank]] = parts[0]
    every = torch.empty(world * width, dtype=got.dtype, device=got.device)
    return _all_gather(every, mine, async_op=True), every, sizes


def _tree_end(flat: torch.Tensor, gathering) -> None:
    """Wait for the all-gather and write the sums back into `flat`."""
    work, every, sizes = gathering
    work.wait()
    world, width = len(sizes), every.numel() // len(sizes)
    edges = [0, *itertools.accumulate(sizes)]  # where each rank's piece starts
    for j, rows in enumerate(every.view(world, width)):
        flat[edges[j] : edges[j + 1]] = rows[: sizes[j]]


def _reduced_in_backward(state: TrainState) -> bool:
    take = getattr(state.static.sharding, "take_reduced", None)
    return take is not None and take()


def slots(params: list[torch.Tensor], limit: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """`Overlapped`'s buckets: param indices in reverse order (the order backward meets
    them), grouped by dtype into buckets of about `limit` bytes; and for each param, its
    (bucket, offset) in its bucket's flat tensor."""
    plan = _buckets(list(range(len(params)))[::-1], limit, tensor=params.__getitem__)
    where: list[tuple[int, int]] = [(0, 0)] * len(params)
    for b, bucket in enumerate(plan):
        offset = 0
        for i in bucket:
            where[i] = (b, offset)
            offset += params[i].numel()
    return plan, where


def _broadcast_buffers(state: TrainState, bucket_bytes: int) -> None:
    for bucket in _buckets(leaves(state.buffers), bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        td.broadcast(flat, src=0)
        _scatter(flat, bucket)


def _scatter(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` back into the tensors it was cat from."""
    parts = torch.split(flat, [t.numel() for t in bucket])
    torch._foreach_copy_(bucket, [p.view_as(t) for p, t in zip(parts, bucket, strict=True)])


def _buckets(items: list, limit: int, tensor=lambda t: t) -> list[list]:
    """Same-dtype groups of about `limit` bytes each, in order of first appearance, of
    tensors (or of `items` that `tensor` maps to one).

    Grouping by dtype (not by runs of equal dtype) keeps interleaved mixed-precision params
    from splitting into many small collectives.
    """
    by_dtype: dict[torch.dtype, list] = defaultdict(list)
    for item in items:
        by_dtype[tensor(item).dtype].append(item)
    out: list[list] = []
    for group in by_dtype.values():
        size = limit  # forces a new bucket for the group's first tensor
        for item in group:
            t = tensor(item)
            nbytes = t.numel() * t.element_size()
            if size + nbytes > limit and size > 0:
                out.append([])
                size = 0
            out[-1].append(item)
            size += nbytes
    return out
