"""Gradient reduction overlapping backward against reduction after it, in order and canonical.

    torchrun --nproc_per_node=2 bench/overlap.py [--steps 10] [--rounds 9] [--bucket-mb 1]
    torchrun --nproc_per_node=4 bench/overlap.py ...
    torchrun --nproc_per_node=8 bench/overlap.py --bucket-mb 25 model.n_layer=12 ...  # GPUs

Builds `recipes/lm.yaml` (plus any `key=value` overrides; `device: auto` takes this rank's
GPU under torchrun, with NCCL) four times in this process, at micro-batches of 8 of the
global batch of 32:

    canonical, after     forward_backward(micro_batch_size=8), bucket_mb=0: the canonical
                         tree reduced after backward (`distributed.tree_reduce_grads`)
    canonical, overlap   the same, bucket_mb=B: the tree's all-to-all per bucket started
                         during the last micro-batch's backward (`distributed.Overlapped`)
    in order, after      micro_batches = the same count per process, bucket_mb=0: bucketed
                         all-reduce after backward (`distributed.all_reduce_grads`)
    in order, overlap    the same, bucket_mb=B: each bucket's all-reduce started during backward

Times `--steps` steps of each, the four alternating in a rotated order round by round on the
same batches, and prints per round the ratios against "in order, after" (the baseline: what
DDP without overlap does), their median over the rounds and their spread.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import _rounds

from functrain import distributed
from functrain.recipe import load_recipe
from functrain.run.build import build, to_device, train_loader

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "in order, after"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--bucket-mb", type=float, default=1.0)
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    a = p.parse_args()
    ctx = distributed.init()
    count = 32 // 8 // ctx.world_size
    canonical = ["step.0.micro_batch_size=8"]
    in_order = [f"step.0.micro_batches={count}", "step.0.micro_batch_size=null"]
    variants = {
        "canonical, after": [*canonical, "bucket_mb=0"],
        "canonical, overlap": [*canonical, f"bucket_mb={a.bucket_mb}"],
        BASELINE: [*in_order, "bucket_mb=0"],
        "in order, overlap": [*in_order, f"bucket_mb={a.bucket_mb}"],
    }
    built = {
        name: build(
            load_recipe(ROOT / "recipes" / "lm.yaml", ["data.num_workers=0", *a.overrides, *over]),
            ctx,
        )
        for name, over in variants.items()
    }
    loader = iter(train_loader(built[BASELINE], start=0))
    batches = [to_device(next(loader), built[BASELINE].device) for _ in range(a.steps)]
    states = {name: b.state for name, b in built.items()}

    ratios = _rounds.ratios(ctx, states, batches, a.rounds, BASELINE)
    if ctx.is_main:
        print(
            f"{ctx.world_size} processes on {built[BASELINE].device.type}, bucket_mb "
            f"{a.bucket_mb}, {a.steps} steps a round, step time / '{BASELINE}', median of "
            f"{a.rounds} rounds (spread):"
        )
        for name, rs in ratios.items():
            print(f"  {name:20s} {statistics.median(rs):.3f} ({min(rs):.3f}-{max(rs):.3f})")
    distributed.close()


if __name__ == "__main__":
    main()
