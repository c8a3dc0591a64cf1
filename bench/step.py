"""The functrain step against a hand-written PyTorch loop doing the same math.

    python bench/step.py [--steps 30] [--rounds 5] [--size small|lm|medium|gpt2]
                         [--precision fp32|bf16|fp16] [--compile]

Time: both loops run in this process, alternating round by round, on the same model and
batches (AdamW foreach, clip_grad_norm_, dropout); prints the median ratio functrain/torch.
Memory: each loop also runs alone in a child process, and the ratio of their peak RSS
(CPU) or peak CUDA allocation is printed, for the donating step, for donate=False, and
with activation checkpointing (`functrain.recompute.checkpoint_blocks`).
`--precision` runs both loops in autocast (fp16: the torch loop with `torch.amp.GradScaler`,
functrain with its loss scale in the state); `--compile` puts both models through
`torch.compile`, with the determinism settings functrain's runs use (for both loops).
Tokens/s of both loops are printed, and on CUDA the model FLOPs utilisation (MFU, nanoGPT's
6N + 12 L d T FLOPs per token against `--peak-tflops`).
Goals: time ratio <= 1.03 (tokens/s >= 0.97), peak-memory ratio <= 1.05 with donation.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import functrain as ft
from functrain import determinism
from functrain.losses import next_token_cross_entropy
from functrain.models import GPT
from functrain.recompute import checkpoint_blocks

SIZES = {
    "small": dict(n_layer=2, n_embd=128, n_head=4, block_size=64, batch=16),
    "lm": dict(n_layer=4, n_embd=128, n_head=4, block_size=128, batch=32),  # recipes/lm.yaml
    "medium": dict(n_layer=4, n_embd=256, n_head=8, block_size=128, batch=16),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch=8),  # for a GPU
}
PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup(size: str, device: str):
    cfg = dict(SIZES[size])
    batch = cfg.pop("batch")
    torch.manual_seed(0)
    model = GPT(dropout=0.1, **cfg).to(device)
    g = torch.Generator().manual_seed(1)
    data = [
        tuple(
            torch.randint(0, 256, (batch, cfg["block_size"]), generator=g).to(device)
            for _ in range(2)
        )
        for _ in range(8)
    ]
    return model, data


def functrain_loop(
    model, data, steps, donate=True, recompute=False, precision="fp32", compiled=False
):
    model = copy.deepcopy(model)
    if recompute:
        checkpoint_blocks(model)
    if compiled:
        model.compile(dynamic=False)  # as functrain's runs do
    state = ft.create(
        model,
        loss=next_token_cross_entropy(),
        optimizer=ft.adamw(lr=1e-3, weight_decay=0.1, decay="all"),  # as the torch loop
        transforms=[ft.forward_backward(), ft.clip_by_global_norm(1.0), ft.apply_optimizer()],
        device=next(model.parameters()).device,
        precision=precision,
    )

    def run():
        nonlocal state
        for i in range(steps):
            state = ft.step(state, data[i % len(data)], donate=donate)
        state.metrics["loss"].item()

    return run


def torch_loop(model, data, steps, precision="fp32", compiled=False):
    model = copy.deepcopy(model).train()
    if compiled:
        model.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    device = next(model.parameters()).device
    dtype = PRECISION[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run():
        for i in range(steps):
            x, y = data[i % len(data)]
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            scaler.step(opt)
            scaler.update()
        loss.item()

    return run


def _flops_per_token(model, cfg: dict) -> float:
    """nanoGPT's estimate: 6 N (matmuls forward and backward) + 12 L d T (attention)."""
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_memory(kind: str, a: argparse.Namespace) -> tuple[float, float]:
    """(memory before the loop, peak memory) in MiB of one loop run alone in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--size",
            a.size,
            "--steps",
            str(a.steps),
            "--device",
            a.device,
            "--precision",
            a.precision,
            *(["--compile"] if a.compile else []),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    before, peak = out.stdout.strip().splitlines()[-1].split()
    return float(before), float(peak)


def child(kind: str, a: argparse.Namespace) -> None:
    model, data = setup(a.size, a.device)
    how = dict(precision=a.precision, compiled=a.compile)
    loops = {
        "torch": lambda: torch_loop(model, data, a.steps, **how),
        "functrain": lambda: functrain_loop(model, data, a.steps, **how),
        "functrain-pure": lambda: functrain_loop(model, data, a.steps, donate=False, **how),
        "functrain-ac": lambda: functrain_loop(model, data, a.steps, recompute=True, **how),
    }
    before = _rss_mib()
    loops[kind]()()
    if a.device == "cuda":
        print(0.0, torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(before, _peak_rss_mib())


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec from
    the parent, so a child of a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _rss_mib() -> float:
    """Resident memory now (MiB): torch, the model and the data, before the loop runs."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISION, default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100/H200 bf16)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    determinism.configure(torch.device(a.device), compiled=a.compile)
    if a.child:
        return child(a.child, a)
    model, data = setup(a.size, a.device)
    how = dict(precision=a.precision, compiled=a.compile)
    ours = functrain_loop(model, data, a.steps, **how)
    theirs = torch_loop(model, data, a.steps, **how)
    ours(), theirs()  # warm-up (and compilation)
    times = {"functrain": [], "torch": []}
    ratios = []
    for r in range(a.rounds):
        if r % 2 == 0:  # alternate which loop goes first
            t_ours, t_theirs = timed(ours), timed(theirs)
        else:
            t_theirs, t_ours = timed(theirs), timed(ours)
        ratios.append(t_ours / t_theirs)
        times["functrain"].append(t_ours)
        times["torch"].append(t_theirs)
        print(f"round {r}: functrain {t_ours:.3f}s  torch {t_theirs:.3f}s  ratio {ratios[-1]:.3f}")
    print(
        f"time ratio (median of {a.rounds}): {statistics.median(ratios):.3f}, spread "
        f"{min(ratios):.3f}-{max(ratios):.3f}  (goal <= 1.03)"
    )
    figures: dict = {
        "size": a.size, "device": a.device, "precision": a.precision, "compile": a.compile,
        "time_ratio_median": statistics.median(ratios), "time_ratios": ratios,
    }  # fmt: skip
    x, _ = data[0]
    tokens = x.numel() * a.steps
    for name, ts in times.items():
        rate = tokens / statistics.median(ts)
        line = f"{name}: {rate:,.0f} tokens/s"
        figures[f"{name}_tokens_per_s"] = rate
        if a.device == "cuda":
            flops = _flops_per_token(model, SIZES[a.size]) * rate
            line += f", MFU {flops / (a.peak_tflops * 1e12):.1%} of {a.peak_tflops:g} TFLOPS"
            figures[f"{name}_mfu"] = flops / (a.peak_tflops * 1e12)
        print(line)
    if a.no_memory:
        return _write(a.json, figures)
    base_before, base = peak_memory("torch", a)
    figures["peak_mib_torch"] = base
    growth = {}
    for kind in ("functrain", "functrain-pure", "functrain-ac"):
        before, peak = peak_memory(kind, a)
        growth[kind] = peak - before
        figures[f"peak_mib_{kind}"] = peak
        print(
            f"peak memory {kind}: {peak:.0f} MiB vs torch {base:.0f} MiB, ratio {peak / base:.3f}; "
            f"growth during the loop {peak - before:.0f} vs {base - base_before:.0f} MiB"
        )
    print(
        "activation checkpointing: the loop's growth "
        f"{growth['functrain-ac']:.0f} vs {growth['functrain']:.0f} MiB without it, ratio "
        f"{growth['functrain-ac'] / growth['functrain']:.2f}"
    )
    _write(a.json, figures)


def _write(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
