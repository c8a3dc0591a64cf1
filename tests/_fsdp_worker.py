"""Run under torchrun by tests/test_fsdp.py: read a sharded snapshot on this many ranks and
write it straight back, so the test can compare the two bitwise. Each rank also writes
the shape of its shard of `tok/weight` to OUT.rank<r>.

    torchrun --nproc_per_node=3 tests/_fsdp_worker.py RECIPE SNAPSHOT OUT [key=value ...]
"""

import sys
import warnings
from pathlib import Path

from functrain import checkpoint, dcp, dist
from functrain.build import build
from functrain.recipe import load_recipe

warnings.filterwarnings("ignore")
recipe_path, snapshot, out, *overrides = sys.argv[1:]
ctx = dist.init()
recipe = load_recipe(recipe_path, overrides)
built = build(
    recipe, world_size=ctx.world_size, rank=ctx.rank, transforms_extra=ctx.transforms(True)
)
state = dcp.load_into(snapshot, checkpoint.read_manifest(snapshot), built.state)
shapes = {k: list(v.shape) for k, v in state.params.items(include_nested=True, leaves_only=True)}
Path(f"{out}.rank{ctx.rank}").write_text(str(shapes[("tok", "weight")]))  # this rank's rows
dcp.save(out, state, {"step": int(state.step)})
dist.close()
