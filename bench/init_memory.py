"""Peak memory per rank of building a sharded (FSDP) state, against the world size.

    python bench/init_memory.py [--layers 8] [--width 1024] [--sizes 1,2,4] [--rounds 3]

For each world size N, `torchrun --nproc_per_node=N` builds the state of recipes/lm.yaml
with a GPT of `--layers` x `--width`, `parallel: fsdp` and plain SGD (no optimizer state:
the model is what is measured) (`functrain.run.build.build`, the probe left out), twice: built on the meta device and made after sharding, each rank
only its rows (`functrain.deferred`, the default), and built eagerly on every rank first
(as before; `GPT.replays_on_meta` switched off). Each rank reports its peak RSS above what
it held after its imports; the medians over `--rounds` of the largest rank are printed.
On one process there is nothing to shard: both build eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def child(eager: bool, layers: int, width: int) -> None:
    import torch  # noqa: F401 -- in the baseline

    from functrain import distributed
    from functrain.models import GPT
    from functrain.recipe import load_recipe
    from functrain.run.build import build

    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    if eager:
        GPT.replays_on_meta = False
    ctx = distributed.init()
    recipe = load_recipe(
        ROOT / "recipes" / "lm.yaml",
        [f"model.n_layer={layers}", f"model.n_embd={width}", "model.n_head=8",
         "parallel=fsdp", "data.dataset.max_bytes=200000", "data.batch_size=32",
         "optim={_component_: functrain.optim.sgd, lr: 0.1}"],
    )  # fmt: skip
    built = build(recipe, ctx)
    params = sum(t.numel() for t in built.state.params.values(True, True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rank": ctx.rank, "mib": (peak - base) / MiB, "local_params": params}))
    distributed.close()


def run(n: int, eager: bool, a: argparse.Namespace) -> float:
    args = [__file__, "--child", "eager" if eager else "meta", "--layers", str(a.layers),
            "--width", str(a.width)]  # fmt: skip
    if n == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", *args]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == n, out
    return max(r["mib"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--sizes", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        return child(a.child == "eager", a.layers, a.width)
    sizes = [int(x) for x in a.sizes.split(",")]
    found = {(n, e): [] for n in sizes for e in (False, True)}
    for r in range(a.rounds):
        for n in sizes if r % 2 == 0 else reversed(sizes):
            for eager in (False, True) if r % 2 == 0 else (True, False):
                found[(n, eager)].append(run(n, eager, a))
    print(f"peak RSS of the largest rank above its imports, MiB, median of {a.rounds}")
    print(f"{'ranks':>5}  {'meta + shard':>14}  {'eager then shard':>16}")
    for n in sizes:
        meta, eager = (statistics.median(found[(n, e)]) for e in (False, True))
        print(f"{n:>5}  {meta:>14.0f}  {eager:>16.0f}")


if __name__ == "__main__":
    main()
