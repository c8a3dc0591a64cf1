"""Snapshot write/read speed against the disk's raw sequential write speed.

    python bench/snapshot.py [--mib 100 400] [--repeats 3] [--dir PATH]

For each size it builds a transformer-shaped TensorDict of float32 params, then alternates
`functrain.checkpoint.save` (including its fsyncs) with `dd if=/dev/zero bs=4M
conv=fdatasync` of the same byte count, and prints MiB/s of each and their ratio (goal
>= 0.6). It also times `load`, hot (files in the page cache) and cold (evicted with
posix_fadvise DONTNEED first).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from functrain import checkpoint

MiB = 1 << 20


def transformer_params(mib: float) -> TensorDict:
    """A GPT-shaped param tree of about `mib` MiB of float32."""
    d = 512 if mib < 250 else 1024
    vocab = 16 * d
    layers = max(1, round((mib * MiB / 4 - vocab * d) / (12 * d * d)))
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    blocks = {
        str(i): {
            "ln1": {"weight": rand(d), "bias": rand(d)},
            "attn": {"qkv": {"weight": rand(3 * d, d), "bias": rand(3 * d)},
                     "proj": {"weight": rand(d, d), "bias": rand(d)}},
            "ln2": {"weight": rand(d), "bias": rand(d)},
            "mlp": {"fc": {"weight": rand(4 * d, d), "bias": rand(4 * d)},
                    "proj": {"weight": rand(d, 4 * d), "bias": rand(d)}},
        }
        for i in range(layers)
    }  # fmt: skip
    params = {"wte": {"weight": rand(vocab, d)}, "wpe": {"weight": rand(1024, d)}, "h": blocks}
    params["ln_f"] = {"weight": rand(d), "bias": rand(d)}
    return TensorDict({"step": torch.tensor(0), "params": params, "buffers": {}}, batch_size=[])


def nbytes(td: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in td.values(True, True))


def time_save(td: TensorDict, path: Path) -> float:
    t0 = time.perf_counter()
    checkpoint.save(path, td, {"step": 0})
    return time.perf_counter() - t0


def time_dd(path: Path, size: int) -> float:
    count = math.ceil(size / (4 * MiB))
    cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=fdatasync"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def evict(path: Path) -> None:
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_load(path: Path, cold: bool) -> float:
    if cold:
        evict(path)
    t0 = time.perf_counter()
    checkpoint.load(path)
    return time.perf_counter() - t0


def bench(mib: float, repeats: int, root: Path) -> None:
    td = transformer_params(mib)
    size = nbytes(td)
    leaves = len(list(td.keys(True, True)))
    saves, dds, hot, cold = [], [], [], []
    for i in range(repeats):
        os.sync()  # start each timing with no dirty pages of the previous one
        saves.append(time_save(td, root / f"state_{i}"))
        os.sync()
        dds.append(time_dd(root / "dd.bin", size))
        (root / "dd.bin").unlink()
        hot.append(time_load(root / f"state_{i}", cold=False))
        cold.append(time_load(root / f"state_{i}", cold=True))
        shutil.rmtree(root / f"state_{i}")

    def rate(times: list[float]) -> str:
        speeds = [size / MiB / t for t in times]
        return f"{statistics.median(speeds):7.0f} MiB/s (runs: {', '.join(f'{s:.0f}' for s in speeds)})"

    save_speed = size / statistics.median(saves)
    dd_speed = size / statistics.median(dds)
    print(f"{size / MiB:.0f} MiB, {leaves} leaves, {repeats} repeats (medians)")
    print(f"  save incl. fsync  {rate(saves)}")
    print(f"  dd conv=fdatasync {rate(dds)}")
    print(f"  ratio save/dd     {save_speed / dd_speed:.2f}  (goal >= 0.6)")
    print(f"  load, hot cache   {rate(hot)}")
    print(f"  load, cold cache  {rate(cold)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[100, 400])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="functrain-bench-", dir=args.dir))
    try:
        for mib in args.mib:
            bench(mib, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
