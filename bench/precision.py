"""The functrain step of the lm recipe's GPT in fp32, bf16 and fp16, eager and compiled.

    python bench/precision.py [--steps 10] [--rounds 7] [--size lm] [--fp16]

The variants (fp32 and bf16, eager and compiled; fp16 too with `--fp16`: on a CPU without
native float16 matmuls it is ~15x slower, so it is left out by default) run in this process, in a rotating order round by round, on the same
model and batches; prints each one's median time per step and its ratio to fp32 eager,
with the spread over rounds. The determinism settings compiled runs need
(`functrain.determinism`) are on for every variant, so that only precision and compilation
differ.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step import SIZES, functrain_loop, setup, timed

from functrain import determinism


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--size", choices=SIZES, default="lm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp16", action="store_true", help="also time fp16 (slow on most CPUs)")
    a = p.parse_args()
    kinds = ("fp32", "bf16", "fp16") if a.fp16 else ("fp32", "bf16")
    variants = [(k, c) for c in (False, True) for k in kinds]
    determinism.configure(torch.device(a.device), compiled=True)
    model, data = setup(a.size, a.device)
    loops = {
        v: functrain_loop(model, data, a.steps, precision=v[0], compiled=v[1]) for v in variants
    }
    for loop in loops.values():
        loop()  # warm-up and compilation
    times: dict = {v: [] for v in variants}
    for r in range(a.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v].append(timed(loops[v]) / a.steps)
    base = times[("fp32", False)]
    for v in variants:
        ratios = [t / b for t, b in zip(times[v], base, strict=True)]
        name = f"{v[0]} {'compiled' if v[1] else 'eager'}"
        print(
            f"{name:14s} {statistics.median(times[v]) * 1e3:8.1f} ms/step  ratio to fp32 eager "
            f"{statistics.median(ratios):.3f} (spread {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
