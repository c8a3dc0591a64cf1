"""Run under torchrun by tests/test_fsdp.py: read a sharded snapshot on this many ranks and
write it straight back, so the test can compare the two bitwise. Each rank also writes
the shape of its shard of `tok/weight` to OUT.rank<r>.

    torchrun --nproc_per_node=3 tests/_fsdp_worker.py RECIPE SNAPSHOT OUT [key=value ...]
"""

import sys
import warnings
from pathlib import Path

from functrain import checkpoint, distributed
from functrain.checkpoint import Snapshots, dcp
from functrain.recipe import load_recipe
from functrain.run.build import build

warnings.filterwarnings("ignore")
recipe_path, snapshot, out, *overrides = sys.argv[1:]
ctx = distributed.init()
recipe = load_recipe(recipe_path, overrides)
built = build(recipe, ctx)
manifest = checkpoint.read_manifest(snapshot)
state = Snapshots.place(Path(snapshot), None, manifest, built.state)
shapes = {k: list(v.shape) for k, v in state.params.items(include_nested=True, leaves_only=True)}
Path(f"{out}.rank{ctx.rank}").write_text(str(shapes[("tok", "weight")]))  # this rank's rows
dcp.save(out, state.tensors(), {"step": int(state.step)}, sharding=built.sharding)
distributed.close()
