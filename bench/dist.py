"""Data-parallel throughput at 1..N ranks and the share of step time spent in the all-reduce.

    python bench/distributed.py [--nproc 1 2] [--size small|medium] [--batch 16] [--steps 20]
                         [--parallel ddp|fsdp]

For each N the script launches itself under `torchrun --nproc_per_node=N` (N = 1 runs in
this process). Every rank trains a GPT (the `bench/step.py` sizes) with the functrain step
on a fixed global batch split over the ranks (strong scaling), with the all-reduce
transform wrapped in a timer. On CPU each rank gets cores/N threads (or --threads). Rank 0 prints one
JSON line; the driver prints a table. The all-reduce time includes waiting for the slower
rank (it is a synchronising collective), so it bounds communication from above.
On GPUs (NCCL), the same command measures the GPU path: `--device cuda`.

With `--parallel fsdp` the model is sharded with FSDP2 (`functrain.distributed.fsdp.shard`); its
all-gathers and reduce-scatters run inside forward and backward, so no communication share
is printed, but the state each rank holds (params + optimizer state) is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import orjson
import torch

import functrain as ft
from functrain import distributed
from functrain.distributed import fsdp
from functrain.losses import next_token_cross_entropy
from functrain.models import GPT

SIZES = {
    "small": dict(n_layer=2, n_embd=128, n_head=4, block_size=64),
    "medium": dict(n_layer=4, n_embd=256, n_head=8, block_size=128),
}


def _timed(transform, seconds: list[float], device: torch.device):
    def wrapper(state, batch):
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the collective, not the queued backward
        t = time.perf_counter()
        out = transform(state, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        return out

    return wrapper


def worker(a: argparse.Namespace) -> None:
    ctx = distributed.init()
    device = torch.device(
        a.device, int(os.environ.get("LOCAL_RANK", 0)) if a.device == "cuda" else None
    )
    if device.type == "cpu":
        threads = a.threads or max(1, (os.cpu_count() or 1) // ctx.world_size)
        torch.set_num_threads(threads)
    cfg = SIZES[a.size]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT(dropout=0.1, **cfg)
    n_params = sum(p.numel() for p in model.parameters())  # before sharding: all of them
    sharded = a.parallel == "fsdp" and ctx.world_size > 1
    sharding = None
    if sharded:
        fsdp.shard(model.to(device), world_size=ctx.world_size, device=device.type)
        sharding = fsdp.Sharding.of(model)
    comm: list[float] = []
    extra = [_timed(t, comm, device) for t in distributed.transforms(ctx, sharded)]
    state = ft.create(
        model,
        loss=next_token_cross_entropy(),
        optimizer=ft.adamw(lr=1e-3, weight_decay=0.1),
        transforms=[
            ft.forward_backward(),
            *extra,
            ft.clip_by_global_norm(1.0),
            ft.apply_optimizer(),
        ],
        device=device,
        placement=ctx,
        sharding=sharding,
    )
    local = a.batch // ctx.world_size
    g = torch.Generator().manual_seed(1 + ctx.rank)
    shape = (local, cfg["block_size"])
    batches = [
        tuple(torch.randint(0, 256, shape, generator=g).to(device) for _ in range(2))
        for _ in range(4)
    ]
    times = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            comm.clear()
        ctx.barrier()
        t = time.perf_counter()
        state = ft.step(state, batches[i % len(batches)])
        state.metrics["loss"].item()  # host sync: the step is done
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    held = [t for e in ("params", "opt") for t in getattr(state, e).values(True, True)]
    state_mb = sum(t.numel() * t.element_size() for t in held) / 2**20
    if ctx.is_main:
        step_s = statistics.median(times)
        comm_s = statistics.median(comm) if comm else 0.0
        row = {"nproc": ctx.world_size, "params": n_params, "step_ms": step_s * 1e3}
        row |= {"comm_ms": comm_s * 1e3, "samples_per_s": a.batch / step_s}
        row |= {"sharded": sharded, "state_mb": state_mb}
        print(orjson.dumps(row).decode(), flush=True)
    distributed.close()


def _launch(a: argparse.Namespace, nproc: int) -> dict:
    args = [__file__, "--worker", "--size", a.size, "--batch", str(a.batch)]
    args += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device]
    args += ["--threads", str(a.threads), "--parallel", a.parallel]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{nproc} rank(s) failed:\n{out.stderr[-3000:]}")
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--batch", type=int, default=16, help="global batch (split over the ranks)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores/N)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    rows = [_launch(a, n) for n in a.nproc]
    base = rows[0]["samples_per_s"]
    print(f"{a.size} GPT, {rows[0]['params']:,} params, global batch {a.batch}, {a.device}")
    head = f"{'ranks':>5} {'step ms':>9} {'samples/s':>10} {'speed-up':>9} {'all-reduce ms':>14}"
    print(f"{head} {'share':>6} {'state MB/rank':>14}")
    for r in rows:
        comm, share = r["comm_ms"], r["comm_ms"] / r["step_ms"]
        comm_s, share_s = ("–", "–") if r["sharded"] else (f"{comm:.1f}", f"{share:.1%}")
        print(
            f"{r['nproc']:>5} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f} "
            f"{r['samples_per_s'] / base:>9.2f} {comm_s:>14} {share_s:>6} {r['state_mb']:>14.2f}"
        )


if __name__ == "__main__":
    main()
