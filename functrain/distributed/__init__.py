"""Parallel training under torchrun: the machinery the pure core knows only as protocols.

    context.py   Context (the core's Placement plus agreement between ranks), init, close
    agree.py     Agreement: stop and failure flags agreed a few steps late, without a sync
    reduce.py    the gradient reductions of data-parallel (`ddp`) runs: during backward
                 (`Overlapped`, a Sharding) or after it (transforms), canonical or not
    fsdp.py      FSDP2: shard a model; its `Sharding` implements `functrain.parallel.Sharding`
    trace.py     FUNCTRAIN_TRACE: which samples each rank trains on

Under torchrun every rank draws its slice of each global batch from the one global cursor.
With `parallel: ddp` every rank holds the whole state and gradients are averaged inside the
step; with `parallel: fsdp` each rank holds a shard and FSDP2's backward reduce-scatters
the gradients.
"""

from functrain.distributed.agree import Agreement
from functrain.distributed.context import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    Context,
    close,
    collective_timeout,
    env_rank,
    init,
    leave,
    peer_failure,
)
from functrain.distributed.reduce import Overlapped, all_reduce_grads, transforms
from functrain.distributed.trace import TRACE_ENV, read_trace, sample_digests, traced

__all__ = [
    "Overlapped",
    "Agreement",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "TRACE_ENV",
    "Context",
    "all_reduce_grads",
    "close",
    "collective_timeout",
    "env_rank",
    "init",
    "leave",
    "peer_failure",
    "read_trace",
    "sample_digests",
    "traced",
    "transforms",
]
