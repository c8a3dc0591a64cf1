"""Per-step host overhead: the functrain step against a hand-written loop on a tiny model.

    python bench/overhead.py [--rounds 15] [--steps 300]

The model is so small (MLP 16-32-4 with dropout, batch 8, one thread) that the math takes
about a millisecond, so what is left is what the framework costs per step on the host:
the RNG fork, TensorDict traversal, swapping the state into the module skeleton. Both
loops do the same math (AdamW foreach, clip_grad_norm_ foreach, dropout) and alternate
round by round in this process. Prints the median step time of each, their difference
and its spread. Goal (issue 11): a difference <= 0.3 ms.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.losses import cross_entropy


def setup() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))]
    return model, data * 4


def functrain_round(model, data, steps: int) -> float:
    state = ft.create(
        copy.deepcopy(model),
        loss=cross_entropy(),
        optimizer=ft.adamw(lr=1e-3, weight_decay=0.1, decay="all"),  # as the torch loop
        transforms=[ft.forward_backward(), ft.clip_by_global_norm(1.0), ft.apply_optimizer()],
    )
    for i in range(20):  # warm up allocator and dispatch caches
        state = ft.step(state, data[i % len(data)])
    t = time.perf_counter()
    for i in range(steps):
        state = ft.step(state, data[i % len(data)])
    return (time.perf_counter() - t) / steps


def torch_round(model, data, steps: int) -> float:
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)

    def one(batch) -> None:
        x, y = batch
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
        opt.step()

    for i in range(20):
        one(data[i % len(data)])
    t = time.perf_counter()
    for i in range(steps):
        one(data[i % len(data)])
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, data = setup()
    ours, theirs = [], []
    for r in range(a.rounds):
        ours.append(functrain_round(model, data, a.steps))
        theirs.append(torch_round(model, data, a.steps))
        print(f"round {r}: functrain {ours[-1] * 1e3:.3f} ms  torch {theirs[-1] * 1e3:.3f} ms")
    diffs = sorted((o - t) * 1e3 for o, t in zip(ours, theirs, strict=True))
    print(
        f"step time (median of {a.rounds}): functrain {statistics.median(ours) * 1e3:.3f} ms, "
        f"torch {statistics.median(theirs) * 1e3:.3f} ms"
    )
    print(
        f"overhead per step: {statistics.median(diffs):.3f} ms (rounds: {diffs[0]:.3f} to "
        f"{diffs[-1]:.3f}; goal <= 0.3)"
    )


if __name__ == "__main__":
    main()
