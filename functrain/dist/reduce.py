"""Averaging gradients over data-parallel ranks inside the step: the all-reduce transform.

With `parallel: ddp` every rank holds the whole state; this transform, placed right after
`forward_backward`, averages the gradients and the loss and broadcasts rank 0's buffers, so
every rank applies the same update. With `parallel: fsdp` backward already reduce-scattered
the gradients, and only the loss and buffers go through it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as td

from functrain.optim import leaves
from functrain.parallel import Placement
from functrain.state import TrainState
from functrain.transform import Transform

__all__ = ["all_reduce_grads", "transforms"]

_BUCKET_BYTES = 25 << 20


def transforms(placement: Placement, sharded: bool = False) -> list[Transform]:
    """The transforms a distributed step needs right after `forward_backward` (none for one
    process). Sharded (FSDP2), gradients are already reduce-scattered: only the loss is
    averaged and the buffers broadcast."""
    return [all_reduce_grads(grads=not sharded)] if placement.world_size > 1 else []


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
        for bucket in _buckets(leaves(state.buffers), bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            td.broadcast(flat, src=0)
            _scatter(flat, bucket)
        return state.replace(metrics=state.metrics.replace(loss=loss))

    return Transform(name="all_reduce_grads", apply=apply)


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
