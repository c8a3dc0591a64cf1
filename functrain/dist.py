"""Data parallel under torchrun: process group, gradient all-reduce, agreement between ranks.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one
process. Under torchrun every rank holds the whole state, draws its slice of each global
batch from the one global cursor, and averages gradients inside the step.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as td

from functrain.optim import leaves
from functrain.runs import RunError
from functrain.state import TrainState, Transform

#: Seconds a collective may wait for the other ranks before the job ends with an error.
TIMEOUT_ENV = "FUNCTRAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_BUCKET_BYTES = 25 << 20


@attrs.frozen
class Context:
    """This process's place in the job."""

    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            td.barrier()

    def warn(self, message: str) -> None:
        if self.is_main:
            print(f"functrain: warning: {message}", file=sys.stderr, flush=True)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (a collective: every rank must call it)."""
        if self.world_size == 1:
            return t
        t = t.detach().clone()
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t / self.world_size

    def agree(self, what: str, value: Any) -> None:
        """Every rank must hold the same `value`, else all ranks raise the same error."""
        if self.world_size == 1:
            return
        values: list[Any] = [None] * self.world_size
        td.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise RunError(
                f"the ranks disagree on the {what} ({listing}); every rank must see the same files"
            )

    def all_ok(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank; if it fails on any rank, raise that error on all of them."""
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            error = err
        if self.world_size > 1:
            reports: list[Any] = [None] * self.world_size
            td.all_gather_object(
                reports, None if error is None else f"{type(error).__name__}: {error}"
            )
            failed = [(r, m) for r, m in enumerate(reports) if m is not None]
            if failed and error is None:
                rank, message = failed[0]
                raise RunError(f"rank {rank} failed: {message}")
        if error is not None:
            raise error
        return result

    def transforms(self) -> list[Transform]:
        """The transforms a distributed step needs after forward/backward."""
        return [all_reduce_grads()] if self.world_size > 1 else []


def init() -> Context:
    """Join the torchrun job if there is one: gloo on CPU, NCCL when CUDA is present."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    if not td.is_initialized():
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return Context(world_size=td.get_world_size(), rank=td.get_rank())


def close() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def all_reduce_grads(bucket_bytes: int = _BUCKET_BYTES) -> Transform:
    """Average gradients over ranks in flat buckets; broadcast rank 0's buffers (as DDP does).

    Every rank then applies the same update to the same params, so the replicas stay equal.
    """

    def transform(state: TrainState, batch: Any) -> TrainState:
        world = state.static.world_size
        grads = leaves(state.grads)
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            td.all_reduce(flat, op=td.ReduceOp.SUM)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        loss = state.metrics["loss"].clone()
        td.all_reduce(loss, op=td.ReduceOp.SUM)
        for b in leaves(state.buffers):
            td.broadcast(b, src=0)
        return state.replace(metrics=state.metrics.replace(loss=loss / world))

    return transform


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors of about `limit` bytes each."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or size + nbytes > limit or out[-1][0].dtype != t.dtype:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out
