"""Run under torchrun by tests/test_deferred.py: build a recipe's state and save its whole
params and buffers (gathered from every rank's shards) for the test to compare.

    torchrun --nproc_per_node=N tests/_init_worker.py OUT.pt RECIPE overrides...
"""

import sys

import torch
from torch.distributed.tensor import DTensor

from functrain import distributed
from functrain.recipe import load_recipe
from functrain.run import build as build_lib

made = []
materialize = build_lib._materialize
build_lib._materialize = lambda *a: made.append(1) or materialize(*a)
ctx = distributed.init()
built = build_lib.build(load_recipe(sys.argv[2], sys.argv[3:]), ctx)
# Sharded, the state holds this rank's rows; the module's DTensors hold the same values.
module = dict(built.sharding.module.named_parameters()) if built.sharding is not None else {}
whole = {}
for entry in ("params", "buffers"):
    for key, t in built.state.tensors()[entry].items(include_nested=True, leaves_only=True):
        name = key if isinstance(key, str) else ".".join(key)
        t = module.get(name, t) if entry == "params" else t
        t = t.full_tensor() if isinstance(t, DTensor) else t  # a collective: every rank
        whole[f"{entry}/{name}"] = t.detach().cpu()
if ctx.rank == 0:
    torch.save({"deferred": bool(made), "tensors": whole}, sys.argv[1])
distributed.close()
