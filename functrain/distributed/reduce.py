"""Averaging gradients over data-parallel ranks inside the step: the all-reduce transform.

With `parallel: ddp` every rank holds the whole state; this transform, placed right after
`forward_backward`, averages the gradients and the loss and broadcasts rank 0's buffers, so
every rank applies the same update. With `parallel: fsdp` backward already reduce-scattered
the gradients, and only the loss and buffers go through it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as td

from functrain.optim import leaves
from functrain.parallel import Placement
from functrain.state import TrainState
from functrain.transform import Transform

__all__ = ["all_reduce_grads", "transforms", "tree_reduce_grads"]

_BUCKET_BYTES = 25 << 20


def transforms(
    placement: Placement, sharded: bool = False, *, canonical: bool = False
) -> list[Transform]:
    """The transforms a distributed step needs right after `forward_backward` (none for one
    process). Sharded (FSDP2), gradients are already reduce-scattered: only the loss is
    averaged and the buffers broadcast. `canonical` (`forward_backward(micro_batch_size=)`,
    unsharded): the ranks' subtree sums are added in the canonical tree."""
    if placement.world_size == 1:
        return []
    if canonical and not sharded:
        return [tree_reduce_grads()]
    return [all_reduce_grads(grads=not sharded)]


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
        reduced = [*leaves(state.grads), loss] if grads else [loss]
        for bucket in _buckets(reduced, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            td.all_reduce(flat, op=td.ReduceOp.SUM)
            flat /= world
            _scatter(flat, bucket)
        _broadcast_buffers(state, bucket_bytes)
        return state.replace(metrics=state.metrics.replace(loss=loss))

    return Transform(name="all_reduce_grads", apply=apply)


def tree_reduce_grads(bucket_bytes: int = _BUCKET_BYTES) -> Transform:
    """Add the ranks' canonical subtree sums of gradients and loss (`functrain.canonical`)
    in the canonical tree, siblings first; unscale (fp16); broadcast rank 0's buffers.

    Per flat bucket, two collectives (`_tree_sum`): an all-to-all hands each rank 1/N of
    every rank's bucket, which it adds in the tree over ranks, and an all-gather puts the
    sums together: 2 (N - 1) / N of the bucket sent per rank, as a ring all-reduce sends,
    and the same bits on every rank and on any power-of-two N.
    """

    def apply(state: TrainState, batch: Any) -> TrainState:
        placement = state.static.placement
        world, rank = placement.world_size, placement.rank
        if world & (world - 1):
            raise ValueError(
                f"the canonical reduction needs a power-of-two world size, got {world}"
            )
        loss = state.metrics["loss"].detach().clone()
        grads = leaves(state.grads)
        for bucket in _buckets([*grads, loss], bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            _tree_sum(flat, world, rank)
            _scatter(flat, bucket)
        state.static.precision.unscale_(grads, state.stats)
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
    sizes = [c.numel() for c in torch.tensor_split(flat, world)]
    edges = [0, *itertools.accumulate(sizes)]  # where each rank's piece starts
    got = torch.empty(world * sizes[rank], dtype=flat.dtype, device=flat.device)
    td.all_to_all_single(
        got, flat, output_split_sizes=[sizes[rank]] * world, input_split_sizes=sizes
    )
    parts = list(got.view(world, sizes[rank]))  # part i: rank i's piece `rank`
    while len(parts) > 1:  # siblings first: (0 + 1), (2 + 3), then their sums
        parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    width = max(sizes)  # all-gather wants equal sizes: pieces differ by at most one
    mine = torch.zeros(width, dtype=flat.dtype, device=flat.device)
    mine[: sizes[rank]] = parts[0]
    every = torch.empty(world * width, dtype=flat.dtype, device=flat.device)
    td.all_gather_into_tensor(every, mine)
    for j, rows in enumerate(every.view(world, width)):
        flat[edges[j] : edges[j + 1]] = rows[: sizes[j]]


def _broadcast_buffers(state: TrainState, bucket_bytes: int) -> None:
    for bucket in _buckets(leaves(state.buffers), bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        td.broadcast(flat, src=0)
        _scatter(flat, bucket)


def _scatter(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` back into the tensors it was cat from."""
    parts = torch.split(flat, [t.numel() for t in bucket])
    torch._foreach_copy_(bucket, [p.view_as(t) for p, t in zip(parts, bucket, strict=True)])


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Same-dtype groups of about `limit` bytes each, in order of first appearance.

    Grouping by dtype (not by runs of equal dtype) keeps interleaved mixed-precision params
    from splitting into many small collectives.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    out: list[list[torch.Tensor]] = []
    for group in by_dtype.values():
        size = limit  # forces a new bucket for the group's first tensor
        for t in group:
            nbytes = t.numel() * t.element_size()
            if size + nbytes > limit and size > 0:
                out.append([])
                size = 0
            out[-1].append(t)
            size += nbytes
    return out
