"""Data parallel under torchrun: process group, gradient all-reduce, agreement between ranks.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one
process. Under torchrun every rank draws its slice of each global batch from the one global
cursor. With `parallel: ddp` every rank holds the whole state and gradients are averaged
inside the step; with `parallel: fsdp` each rank holds a shard (`functrain.fsdp`) and FSDP2's
backward reduce-scatters them.

Debugging aid: with `FUNCTRAIN_TRACE=DIR` each rank appends to `DIR/rank<r>.jsonl` a header
line `{"pid", "rank", "world_size"}` and then, for every batch it trains on, the global
cursor before the batch and a short digest of each sample: `{"samples": 96, "rows": [...]}`.
Concatenating the rows of ranks 0..W-1 at one cursor gives the global batch, so runs at
different world sizes can be compared sample by sample.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import torch
import torch.distributed as td
from torch.utils._pytree import tree_flatten

from functrain.optim import leaves
from functrain.runs import RunError
from functrain.state import TrainState, Transform

#: Seconds a collective may wait for the other ranks before the job ends with an error.
TIMEOUT_ENV = "FUNCTRAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
#: A directory: each rank records the samples it trains on there (see the module docstring).
TRACE_ENV = "FUNCTRAIN_TRACE"
_BUCKET_BYTES = 25 << 20


def env_rank() -> int:
    """This process's global rank as torchrun announced it (0 without torchrun); no group needed."""
    return int(os.environ.get("RANK", "0"))


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

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one tiny all_reduce: call on all ranks)."""
        if self.world_size == 1:
            return flag
        device = "cuda" if td.get_backend() == "nccl" else "cpu"
        t = torch.tensor(int(flag), device=device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t)

    def agree(self, what: str, value: Any) -> None:
        """Every rank must hold the same `value`, else all ranks raise the same error."""
        if self.world_size == 1:
            return
        values: list[Any] = [None] * self.world_size
        td.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise RunError(
                f"the ranks disagree on the {what} ({listing}); every rank must see the same "
                "files and run the same software"
            )

    def all_ok(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank; if it fails on any rank, raise that error on all of them.

        The failing rank re-raises its own exception; the others raise a RunError naming the
        first failing rank and its message, so every rank exits the same way.
        """
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            error = err
        if self.world_size > 1:
            reports: list[Any] = [None] * self.world_size
            td.all_gather_object(reports, None if error is None else str(error))
            failed = [(r, m) for r, m in enumerate(reports) if m is not None]
            if failed and error is None:
                rank, message = failed[0]
                raise RunError(f"on rank {rank}: {message}")
        if error is not None:
            raise error
        return result

    def transforms(self, sharded: bool = False) -> list[Transform]:
        """The transforms a distributed step needs after forward/backward.

        Sharded (FSDP2), gradients are already reduce-scattered: only the loss is averaged
        and the buffers broadcast.
        """
        return [all_reduce_grads(grads=not sharded)] if self.world_size > 1 else []


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


def peer_failure(err: BaseException) -> str | None:
    """A one-line explanation if `err` is a collective that failed because a rank is gone.

    gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer", "Timed
    out"), NCCL as a DistBackendError: both only while a process group is up.
    """
    if not (td.is_initialized() and td.get_world_size() > 1 and isinstance(err, RuntimeError)):
        return None
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, td.DistError) and not any(w in text for w in ("gloo", "NCCL")):
        return None
    return (
        f"a collective failed: another rank died, hung or timed out ({text[:300]}). "
        "The newest snapshot is intact: continue with `functrain resume RECIPE --from latest`"
    )


def close() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def all_reduce_grads(bucket_bytes: int = _BUCKET_BYTES, *, grads: bool = True) -> Transform:
    """Average gradients (and the loss) over ranks; broadcast rank 0's buffers, as DDP does.

    Tensors are grouped by dtype into flat buckets of about `bucket_bytes`: one `cat`, one
    all-reduce and one split-copy per bucket. The loss rides in the last float32 bucket, so
    a float32 model costs one collective per step (plus one per buffer dtype). Every rank
    then applies the same update to the same params, so the replicas stay equal.

    With `grads=False` (FSDP2, whose backward already reduce-scattered them) only the loss
    is averaged and the buffers broadcast.
    """

    def transform(state: TrainState, batch: Any) -> TrainState:
        world = state.static.world_size
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

    return transform


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


def traced(batches: Iterator[Any], ctx: Context, start: int, global_batch: int) -> Iterator[Any]:
    """`batches` unchanged; with FUNCTRAIN_TRACE set, record each one (module docstring)."""
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        return batches
    return _trace(batches, ctx, start, global_batch, Path(directory))


def _trace(
    batches: Iterator[Any], ctx: Context, start: int, global_batch: int, directory: Path
) -> Iterator[Any]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"rank{ctx.rank}.jsonl", "ab", buffering=0) as f:
        head = {"pid": os.getpid(), "rank": ctx.rank, "world_size": ctx.world_size}
        f.write(orjson.dumps(head) + b"\n")
        for i, batch in enumerate(batches):
            record = {"samples": start + i * global_batch, "rows": sample_digests(batch)}
            f.write(orjson.dumps(record) + b"\n")
            yield batch


def sample_digests(batch: Any) -> list[str]:
    """A 16-hex-digit digest of each sample (row 0..n-1 of every tensor in the batch)."""
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    rows = [t.detach().cpu().reshape(t.shape[0], -1).contiguous() for t in tensors]
    out = []
    for i in range(rows[0].shape[0]):
        h = hashlib.blake2b(digest_size=8)
        for r in rows:
            h.update(r[i].view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out
