"""Run under torchrun by tests/test_dist.py: one all_reduce_grads step on a mixed-dtype state.

    torchrun --nproc_per_node=2 tests/_dist_worker.py OUT_DIR

Rank r sets every gradient to (r + 1) * arange, its loss to r + 1 and its buffers to r + 1,
runs the transform with a tiny bucket size (several buckets per dtype), and writes what it
got to OUT_DIR/rank<r>.json for the test to check.
"""

import sys
from pathlib import Path

import orjson
import torch
from tensordict import TensorDict
from torch import nn

import functrain as ft
from functrain import distributed
from functrain.losses import cross_entropy
from functrain.optim import leaves


class Mixed(nn.Module):
    """Params of interleaved dtypes (float32, float64, bfloat16, float32) and two buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 4))
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
        self.d = nn.Parameter(torch.zeros(7))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("stat", torch.zeros(3))


def _name(key) -> str:
    return key if isinstance(key, str) else "/".join(key)


ctx = distributed.init()
state = ft.create(
    Mixed(),
    loss=cross_entropy(),
    optimizer=ft.adamw(lr=1e-3),
    transforms=[ft.apply_optimizer()],
    placement=ctx,
)
scale = ctx.rank + 1
grads = [torch.arange(p.numel()).view_as(p).to(p.dtype) * scale for p in leaves(state.params)]
keys = list(state.params.keys(include_nested=True, leaves_only=True))
for b in leaves(state.buffers):
    b.fill_(scale)
state = state.replace(
    grads=TensorDict(dict(zip(keys, grads, strict=True)), batch_size=[]),
    metrics=state.metrics.replace(loss=torch.tensor(float(scale))),
)
out = distributed.all_reduce_grads(bucket_bytes=32)(state, None)
report = {
    "grads": {
        _name(k): [str(g.dtype), g.flatten().double().tolist()]
        for k, g in out.grads.items(True, True)
    },
    "same_objects": all(a is b for a, b in zip(leaves(out.grads), grads, strict=True)),
    "buffers": {_name(k): b.flatten().tolist() for k, b in out.buffers.items(True, True)},
    "loss": out.metrics["loss"].item(),
}
Path(sys.argv[1], f"rank{ctx.rank}.json").write_bytes(orjson.dumps(report))
distributed.close()
