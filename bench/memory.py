"""Peak memory of a whole `functrain run` and `functrain resume` against a hand-written loop.

    python bench/memory.py [--rounds 5] [--steps 4] [--layers 4] [--width 512]

Each variant runs alone in a fresh child process; its peak RSS above what the process held
after its imports is the figure (`ru_maxrss` minus the RSS after `import torch, functrain`):
- `hand`: the same GPT and AdamW (torch.optim, foreach) trained `--steps` steps by a loop
  of plain PyTorch on batches of the same shape;
- `hand-resume`: the loop resuming: `torch.load` of a checkpoint (model and optimizer
  state dicts), `load_state_dict` into a fresh model and optimizer, then the steps;
- `run`: `functrain run` of recipes/lm.yaml with that model, to step `--steps`: the build,
  the trial step, the run's steps and snapshots;
- `resume`: `functrain resume` of that run from its step-2 snapshot to step `--steps`.
The variants alternate round by round; medians and spreads over the rounds are printed,
with the ratios run/hand and resume/hand-resume (goal: within 5 %).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lm.yaml"
MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _overrides(a: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"out_dir={out}", f"steps={a.steps}", f"model.n_layer={a.layers}",
        f"model.n_embd={a.width}", "model.n_head=8", "model.block_size=64",
        "data.dataset.block_size=64", "data.dataset.max_bytes=2000000", "data.batch_size=8",
        "checkpoint.every=2", "checkpoint.keep_last=null", "log_every=1", "eval.every=null",
        "schedule.warmup_steps=1", "model.dropout=0.0",
    ]  # fmt: skip


def _hand(a: argparse.Namespace, out: Path, resume: bool) -> None:
    import torch
    import torch.nn.functional as F

    from functrain.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=64, n_layer=a.layers, n_head=8, n_embd=a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    path = out / "hand.pt"
    if resume:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        del saved
    g = torch.Generator().manual_seed(1)
    for _ in range(a.steps):
        x = torch.randint(0, 256, (8, 65), generator=g)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if not resume:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)


def child(a: argparse.Namespace) -> None:
    import torch  # noqa: F401 -- the baseline holds torch and functrain

    from functrain.cli import main

    base = _rss()
    out = Path(a.out)
    if a.child == "hand":
        _hand(a, out, resume=False)
    elif a.child == "hand-resume":
        _hand(a, out, resume=True)
    elif a.child == "run":
        name = f"run{a.round}"
        assert main(["run", str(RECIPE), *_overrides(a, out), f"name={name}"]) == 0
    else:
        args = ["resume", str(RECIPE), *_overrides(a, out), "name=base", "--from", "state_2"]
        assert main([*args, "--name", f"resumed{a.round}"]) == 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak}))


def _measure(a: argparse.Namespace, variant: str, out: Path, round_: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--out", str(out), "--round",
           str(round_), "--steps", str(a.steps), "--layers", str(a.layers),
           "--width", str(a.width)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--child")
    p.add_argument("--out")
    p.add_argument("--round", type=int, default=0)
    a = p.parse_args()
    if a.child:
        return child(a)
    variants = ("hand", "hand-resume", "run", "resume")
    with tempfile.TemporaryDirectory(prefix="functrain-memory-") as tmp:
        out = Path(tmp)
        _measure(a, "hand", out, 0)  # the hand loop's checkpoint to resume from
        from functrain.cli import main as cli

        assert cli(["run", str(RECIPE), *_overrides(a, out), "name=base"]) == 0
        found: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(1, a.rounds + 1):
            for v in variants if r % 2 else reversed(variants):
                m = _measure(a, v, out, r)
                found[v].append((m["peak"] - m["base"]) / MiB)
    print(f"peak RSS above the imports, MiB, median [min, max] of {a.rounds} rounds")
    med = {v: statistics.median(xs) for v, xs in found.items()}
    for v, xs in found.items():
        print(f"  {v:<12} {med[v]:8.1f}  [{min(xs):.1f}, {max(xs):.1f}]")
    print(f"run / hand:           {med['run'] / med['hand']:.3f}")
    print(f"resume / hand-resume: {med['resume'] / med['hand-resume']:.3f}")
    print(f"resume / hand:        {med['resume'] / med['hand']:.3f}")


if __name__ == "__main__":
    main()
