"""Resume time-to-first-step at step 100 against step 100,000, for the same state.

    python bench/resume.py [--early 100] [--late 100000] [--repeats 9] [--cold] [--threads N]

It builds one TrainState (the GPT + AdamW of bench/async_snapshot.py, about 260 MiB) and
saves it twice, differing only in `step` and the data cursor `data.samples` (step x batch).
Then, alternating between the two snapshots, it times what a resume does before training
goes on: `checkpoint.load` (with every checksum), `TrainState.load` onto the rebuilt
template, `make_loader(start=cursor)` and its first batch, and the first step (synced).
It prints the medians per phase and the ratio late/early (goal <= 1.1). With `--cold` the
snapshot files are evicted from the page cache before each load. The only phase that could
depend on the step is the loader's, so it is also timed alone, 50 times each, alternating.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from async_snapshot import build_state  # the same state as the async snapshot benchmark
from snapshot import evict
from tensordict import TensorDict

import functrain as ft
from functrain import checkpoint
from functrain.data import ByteBlocks, make_loader

MiB = 1 << 20
BATCH, BLOCK = 8, 16


def dataset() -> ByteBlocks:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1 << 22,), generator=g, dtype=torch.uint8)
    return ByteBlocks(data.numpy().tobytes(), block_size=BLOCK)


def save_at(template: ft.TrainState, step: int, path: Path) -> None:
    cursor = TensorDict({"samples": torch.tensor(step * BATCH)}, batch_size=[])
    state = template.replace(step=torch.tensor(step), data=cursor)
    checkpoint.save(path, state.tensors(), {"step": step})


def resume(template: ft.TrainState, data: ByteBlocks, path: Path, cold: bool) -> dict:
    """Seconds per phase of one resume, up to the end of the first step."""
    if cold:
        evict(path)
    t = [time.perf_counter()]
    tensors, manifest = checkpoint.load(path)
    t.append(time.perf_counter())
    state = template.load(tensors)
    del tensors
    t.append(time.perf_counter())
    start = int(state.data["samples"])
    batch = next(iter(make_loader(data, batch_size=BATCH, seed=0, start=start)))
    t.append(time.perf_counter())
    state = ft.step(state, batch)
    state.metrics["loss"].item()  # the step has run, not just been queued
    t.append(time.perf_counter())
    if int(state.step) != manifest["step"] + 1:
        raise RuntimeError(f"resumed at {int(state.step) - 1}, expected {manifest['step']}")
    phases = ("load", "state", "loader", "step")
    times = {k: b - a for k, a, b in zip(phases, t, t[1:], strict=False)}
    return {**times, "total": t[-1] - t[0]}


def loader_times(data: ByteBlocks, steps: tuple[int, int], n: int = 50) -> dict[int, float]:
    """Median seconds for make_loader(start=step x batch) and its first batch, per step."""
    times: dict[int, list[float]] = {s: [] for s in steps}
    for _ in range(n):
        for s in steps:
            t0 = time.perf_counter()
            next(iter(make_loader(data, batch_size=BATCH, seed=0, start=s * BATCH)))
            times[s].append(time.perf_counter() - t0)
    return {s: statistics.median(t) for s, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--early", type=int, default=100)
    parser.add_argument("--late", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cold", action="store_true", help="evict the files before each load")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="functrain-bench-", dir=args.dir))
    template, data = build_state(7, 512), dataset()
    size = sum(t.numel() * t.element_size() for t in template.tensors().values(True, True))
    steps = (args.early, args.late)
    runs: dict[int, list[dict]] = {s: [] for s in steps}
    try:
        for s in steps:
            save_at(template, s, root / f"state_{s}")
        resume(template, data, root / f"state_{steps[0]}", args.cold)  # warm up
        for r in range(args.repeats):
            for s in steps if r % 2 == 0 else steps[::-1]:  # alternate which goes first
                runs[s].append(resume(template, data, root / f"state_{s}", args.cold))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    alone = loader_times(data, steps)
    print(
        f"state {size / MiB:.0f} MiB, {len(data)} samples, batch {BATCH}, {args.repeats} "
        f"repeats ({'cold' if args.cold else 'hot'} page cache), "
        f"{torch.get_num_threads()} threads, medians in ms:"
    )
    print(f"  {'step':>8}" + "".join(f"{k:>9}" for k in runs[steps[0]][0]))
    for s in steps:
        cells = [statistics.median(r[k] for r in runs[s]) * 1e3 for k in runs[s][0]]
        print(f"  {s:>8}" + "".join(f"{c:>9.1f}" for c in cells))
    total = {s: statistics.median(r["total"] for r in runs[s]) for s in steps}
    print("  total, every run: " + "; ".join(
        f"{s}: " + ", ".join(f"{r['total'] * 1e3:.0f}" for r in runs[s]) for s in steps
    ))  # fmt: skip
    print(f"  ratio {steps[1]}/{steps[0]}: {total[steps[1]] / total[steps[0]]:.2f}  (goal <= 1.1)")
    print(
        f"  loader alone (50 each): {steps[0]}: {alone[steps[0]] * 1e3:.1f} ms, "
        f"{steps[1]}: {alone[steps[1]] * 1e3:.1f} ms, ratio {alone[steps[1]] / alone[steps[0]]:.2f}"
    )


if __name__ == "__main__":
    main()
