"""Which samples each rank trains on: a debugging aid for runs at different world sizes.

With `FUNCTRAIN_TRACE=DIR` each rank appends to `DIR/rank<r>.jsonl` a header line
`{"pid", "rank", "world_size"}` and then, for every batch it trains on, the global cursor
before the batch, the dataset index of each of its samples (for map-style data and
streams; a stream's index is `epoch * len + index`) and a short digest of each sample:
`{"samples": 96, "indices": [...], "rows": [...]}`. Concatenating the rows (or indices) of
ranks 0..W-1 at one cursor gives the global batch, so runs at different world sizes can be
compared sample by sample.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import torch
from torch.utils._pytree import tree_flatten

from functrain.parallel import Placement

__all__ = ["TRACE_ENV", "read_trace", "sample_digests", "traced"]

#: A directory: each rank records the samples it trains on there (see the module docstring).
TRACE_ENV = "FUNCTRAIN_TRACE"


def traced(
    batches: Iterator[Any],
    ctx: Placement,
    start: int,
    global_batch: int,
    indices: Callable[[int], list[int]] | None = None,
) -> Iterator[Any]:
    """`batches` unchanged; with FUNCTRAIN_TRACE set, record each one (module docstring).
    `indices(cursor)`: this rank's dataset indices of the batch at a cursor, when known."""
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        return batches
    return _trace(batches, ctx, start, global_batch, Path(directory), indices)


def _trace(
    batches: Iterator[Any],
    ctx: Placement,
    start: int,
    global_batch: int,
    directory: Path,
    indices: Callable[[int], list[int]] | None,
) -> Iterator[Any]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"rank{ctx.rank}.jsonl", "ab", buffering=0) as f:
        head = {"pid": os.getpid(), "rank": ctx.rank, "world_size": ctx.world_size}
        f.write(orjson.dumps(head) + b"\n")
        for i, batch in enumerate(batches):
            cursor = start + i * global_batch
            record: dict[str, Any] = {"samples": cursor}
            if indices is not None:
                record["indices"] = indices(cursor)
            record["rows"] = sample_digests(batch)
            f.write(orjson.dumps(record) + b"\n")
            yield batch


def read_trace(directory: Path) -> dict[int, dict[str, list]]:
    """Global cursor -> the global batch there, `{"indices": [...], "rows": [...]}`, ranks'
    slices joined in rank order, from every process that appended to `directory`."""
    per_cursor: dict[int, dict[int, dict]] = {}
    for f in sorted(directory.glob("rank*.jsonl")):
        rank = None
        for line in f.read_bytes().splitlines():
            record = orjson.loads(line)
            if "rank" in record:  # a process's header line
                rank = record["rank"]
                continue
            per_cursor.setdefault(record["samples"], {})[rank] = record
    return {
        cursor: {
            "indices": [i for r in sorted(ranks) for i in ranks[r].get("indices", [])],
            "rows": [d for r in sorted(ranks) for d in ranks[r]["rows"]],
        }
        for cursor, ranks in per_cursor.items()
    }


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
