"""The token-file loader against nanoGPT's `get_batch`, and resume time at a far position.

    python bench/data.py [--mib 512] [--batches 300] [--rounds 5] [--block 256] [--batch 32]
    python bench/data.py --memory-only --file big.bin --mib 4096 --batches 60  # README: cgroup

Writes a token file of `--mib` MiB of random uint16 tokens (in a temporary folder, removed
after), then:
- throughput: tokens/s of `make_loader(token_file(...))` (shuffled windows; 0 and 2
  workers) against nanoGPT's `get_batch` (random windows from an `np.memmap` opened per
  batch, stacked to int64), the same batch shape, `--batches` batches per round,
  alternating rounds; the median ratio and the spread;
- resume: time to the first batch of a loader made at position 0 and at position 10^9
  samples (epoch 10^9 // windows, in the middle of it), median of 20 each, and the ratio;
- memory: the loader's growth of anonymous RSS (its own memory) and of file-backed RSS
  (mapped pages of the file, which the kernel maps around each fault and can reclaim) over
  `--batches` batches; with `--memory-only`, only this, for 0 and 2 workers (the workers'
  memory added), on a file that can be larger than the page cache the process may use.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from functrain.data import make_loader, token_file


def get_batch(path: Path, block: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's train.py `get_batch`, on the CPU."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # per batch, as nanoGPT does
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
    return x, y


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))


def write_tokens(path: Path, mib: int) -> None:
    """`mib` MiB of random uint16 tokens, written 64 MiB at a time."""
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        for lo in range(0, mib, 64):
            n = min(64, mib - lo) * 2**19
            f.write(
                torch.randint(0, 50257, (n,), generator=g, dtype=torch.int32)
                .to(torch.uint16)
                .numpy()
                .tobytes()
            )


def memory(train, a) -> None:
    """Resident memory of the loader (main process plus workers) over `a.batches` batches."""
    for workers in (0, 2):
        it = iter(make_loader(train, batch_size=a.batch, seed=0, num_workers=workers))
        next(it)
        pids = ["self", *(w.pid for w in getattr(it, "_workers", []))]
        before = [rss_mib(p) for p in pids]
        for _ in range(a.batches):
            next(it)
        grew = [
            tuple(x - y for x, y in zip(rss_mib(p), b, strict=True))
            for p, b in zip(pids, before, strict=True)
        ]
        total = [sum(g[k] for g in grew) for k in (0, 1)]
        print(
            f"{workers} workers, {a.batches} batches from {a.mib} MiB: loader's own memory "
            f"grew {total[0]:.1f} MiB (RssAnon, {len(pids)} processes), mapped file pages "
            f"{total[1]:.1f} MiB (RssFile)"
        )
        del it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--file", help="a token file to use (written there first if missing)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.file or Path(tmp) / "train.bin")
        if not path.exists():
            write_tokens(path, a.mib)
        train = token_file(str(path), block_size=a.block, val_fraction=0.0)["train"]
        if a.memory_only:
            return memory(train, a)
        tokens = a.batch * a.block * a.batches

        def ours(workers: int):
            # One loader for all rounds (workers started once, as in training); the first
            # batch, which waits for the workers to start, is taken before any round.
            it = iter(make_loader(train, batch_size=a.batch, seed=0, num_workers=workers))
            next(it)

            def run() -> None:
                for _ in range(a.batches):
                    next(it)

            return run

        def theirs() -> None:
            for _ in range(a.batches):
                get_batch(path, a.block, a.batch)

        before = rss_mib()
        ours(0)()
        after = rss_mib()
        print(
            f"file {a.mib} MiB, {len(train):,} windows; over {a.batches} batches the loader's "
            f"own memory grew {after[0] - before[0]:.1f} MiB (RssAnon), mapped file pages "
            f"{after[1] - before[1]:.1f} MiB (RssFile: page cache, reclaimable)"
        )
        loops = {"functrain, 0 workers": ours(0), "functrain, 2 workers": ours(2)}
        for name, loop in loops.items():
            ratios = []
            for r in range(a.rounds):
                if r % 2 == 0:
                    t_ours, t_theirs = timed(loop), timed(theirs)
                else:
                    t_theirs, t_ours = timed(theirs), timed(loop)
                ratios.append(t_theirs / t_ours)  # > 1: functrain is faster
            print(
                f"{name}: {tokens / t_ours:,.0f} tokens/s (last round); throughput ratio to "
                f"get_batch (median of {a.rounds}) {statistics.median(ratios):.2f}, spread "
                f"{min(ratios):.2f}-{max(ratios):.2f}  (goal >= 1.0 with workers)"
            )
        far = (10**9 // a.batch) * a.batch
        first = {}
        for start in (0, far):
            first[start] = [
                timed(lambda s=start: next(iter(make_loader(train, batch_size=a.batch, seed=0, start=s))))
                for _ in range(20)
            ]  # fmt: skip
        t0, t9 = statistics.median(first[0]), statistics.median(first[far])
        print(
            f"resume: first batch at 0 {t0 * 1e3:.2f} ms, at {far:,} {t9 * 1e3:.2f} ms, "
            f"ratio {t9 / t0:.2f}  (goal <= 1.1)"
        )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
