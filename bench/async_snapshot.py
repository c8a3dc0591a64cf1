"""Training stall per async snapshot against a plain clone of the state.

    python bench/async_snapshot.py [--layers 7] [--d 512] [--repeats 9] [--threads N] [--dir PATH]

It builds a real TrainState (a GPT with AdamW: params and two moments, about 260 MiB with
the defaults) and trains it. Each repeat times, one after the other:

- clone: `state.tensors().clone()`, the least a snapshot that doesn't block on I/O can cost;
- stall: `AsyncWriter.save(...)` on the same state, i.e. what the training loop waits for
  (staging into the reused host buffer and starting the writer thread), with no earlier
  write in flight;

then trains while the write runs, and a few steps more with none running. It prints
the medians, their ratio (goal <= 1.5), the first save separately (it allocates the staging
buffer), and the step time with and without a write in the background.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import functrain as ft
from functrain.checkpoint import AsyncWriter
from functrain.losses import next_token_cross_entropy
from functrain.models import GPT

MiB = 1 << 20


def build_state(layers: int, d: int) -> ft.TrainState:
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=64, n_layer=layers, n_head=8, n_embd=d, dropout=0.0)
    return ft.create(
        model,
        loss=next_token_cross_entropy(),
        optimizer=ft.adamw(lr=1e-4),
        transforms=[ft.forward_backward(), ft.apply_optimizer()],
    )


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, 256, (1, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def timed_steps(state: ft.TrainState, n: int, start: int) -> tuple[ft.TrainState, list[float]]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        state = ft.step(state, batch(start + i))
        state.metrics["loss"].item()  # a CUDA step would only be queued without a sync
        times.append(time.perf_counter() - t0)
    return state, times


def clone_time(state: ft.TrainState) -> float:
    t0 = time.perf_counter()
    copy = state.tensors().clone()
    dt = time.perf_counter() - t0
    del copy
    return dt


def stall_time(writer: AsyncWriter, state: ft.TrainState, path: Path) -> float:
    writer.wait_until_finished()  # not timed: only the stall of this snapshot counts
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    writer.save(path, state.tensors(), {"step": int(state.step)})
    return time.perf_counter() - t0


def fmt(times: list[float]) -> str:
    runs = ", ".join(f"{t * 1e3:.0f}" for t in times)
    return f"{statistics.median(times) * 1e3:7.1f} ms (runs: {runs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--d", type=int, default=512, help="model width (n_embd)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="steps with no write, per repeat")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="functrain-bench-", dir=args.dir))
    state = build_state(args.layers, args.d)
    size = sum(t.numel() * t.element_size() for t in state.tensors().values(True, True))
    state, _ = timed_steps(state, 2, 0)  # warm up
    clones, stalls, busy, idle = [], [], [], []
    try:
        with AsyncWriter() as writer:
            first = stall_time(writer, state, root / "state")
            for r in range(args.repeats):
                clones.append(clone_time(state))
                stalls.append(stall_time(writer, state, root / "state"))
                for i in range(50):  # train while the write runs
                    if not writer.busy:
                        break
                    state, t = timed_steps(state, 1, 100 * r + i)
                    busy += t
                writer.wait_until_finished()
                state, t = timed_steps(state, args.steps, 100 * r + 50)
                idle += t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(stalls) / statistics.median(clones)
    print(
        f"state {size / MiB:.0f} MiB, {args.repeats} repeats (medians), "
        f"{torch.get_num_threads()} threads, snapshots in {args.dir}"
    )
    print(f"  plain clone of the state   {fmt(clones)}")
    print(f"  async snapshot stall       {fmt(stalls)}")
    print(f"  ratio stall/clone          {ratio:.2f}  (goal <= 1.5)")
    print(f"  first stall (allocates)    {first * 1e3:7.1f} ms")
    if busy:
        print(f"  step, write in background  {fmt(busy)}")  # started while a write ran
    print(f"  step, no write running     {fmt(idle)}")


if __name__ == "__main__":
    main()
