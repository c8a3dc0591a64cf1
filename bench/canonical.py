"""Canonical micro-batches against today's in-order accumulation and bucketed all-reduce.

    python bench/canonical.py [--steps 10] [--rounds 7]                  # 1 process
    torchrun --nproc_per_node=2 bench/canonical.py [--steps 10] [--rounds 7]

Builds `recipes/lm.yaml` twice in this process, at the same micro-batch size M = 8 of the
global batch of 32: once with `forward_backward(micro_batch_size=8)` (the canonical tree,
`distributed.tree_reduce_grads` under torchrun) and once with `micro_batches` = the same count per
process (accumulated in order, `distributed.all_reduce_grads`). Times `--steps` steps of each,
alternating round by round on the same batches; prints the median ratio canonical/bucketed
and the spread. Memory: the most partial gradient sums the canonical tree held at once
(`TreeSum.peak`, counted as the step runs), against the bound log2(V) + 1 gradient buffers.
Goal: time ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import _rounds

from functrain import canonical, distributed
from functrain.recipe import load_recipe
from functrain.run.build import build, to_device, train_loader

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    ctx = distributed.init()
    count = 32 // 8 // ctx.world_size
    after = ["data.num_workers=0", "bucket_mb=0"]  # both reduced after backward
    ours = ["step.0.micro_batch_size=8", *after]
    theirs = [f"step.0.micro_batches={count}", "step.0.micro_batch_size=null", *after]
    built = {
        name: build(load_recipe(ROOT / "recipes" / "lm.yaml", over), ctx)
        for name, over in (("canonical", ours), ("bucketed", theirs))
    }
    loader = iter(train_loader(built["bucketed"], start=0))
    batches = [to_device(next(loader), built["bucketed"].device) for _ in range(a.steps)]
    states = {name: b.state for name, b in built.items()}
    peaks = []
    original = canonical.TreeSum.push

    def counted(self, tensors):  # record the tree's peak as the step runs
        original(self, tensors)
        peaks.append(self.peak)

    canonical.TreeSum.push = counted

    ratios = _rounds.ratios(ctx, states, batches, a.rounds, "bucketed")["canonical"]
    if ctx.is_main:
        v = 32 // 8
        print(
            f"{ctx.world_size} process(es), V = {v} micro-batches of 8, {a.steps} steps a round: "
            f"step time canonical / bucketed, median of {a.rounds} {statistics.median(ratios):.3f}, "
            f"spread {min(ratios):.3f}-{max(ratios):.3f} (goal <= 1.10); the tree held at most "
            f"{max(peaks)} partial gradient sums (bound log2(V) + 1 = {int(math.log2(v)) + 1})"
        )
    distributed.close()


if __name__ == "__main__":
    main()
