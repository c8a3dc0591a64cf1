"""The run loop: the side effects (log, eval, snapshot) around the pure step.

batch = next(loader)            # the loader was positioned from the state's cursor
state = step(state, batch)
every N: log / eval / snapshot  # the only places the host syncs
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import torch
from torch.utils._pytree import tree_map

from functrain.state import TrainState
from functrain.step import step as run_step


def to_device(batch: Any, device: torch.device) -> Any:
    non_blocking = device.type == "cuda"
    return tree_map(
        lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
        batch,
    )


@torch.no_grad()
def evaluate(
    state: TrainState, batches: Iterator[Any], n: int, device: torch.device
) -> torch.Tensor:
    """Mean loss over `n` batches, model in eval mode, no RNG drawn, state unchanged."""
    model = state.static.model
    model.eval()
    total = torch.zeros((), device=device)
    try:
        with state.bind() as model:
            for _ in range(n):
                total += state.static.loss(model, to_device(next(batches), device)).float()
    finally:
        model.train()
    return total / n


class Progress:
    """One updating line on a terminal; plain periodic lines otherwise."""

    def __init__(self, total: int, start: int, stream=None) -> None:
        self.total, self.start = total, start
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, record: dict) -> None:
        done = record["step"] - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - record["step"]) if done else float("nan")
        parts = [
            f"step {record['step']}/{self.total}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.3g}",
            f"{record['samples_per_s']:.1f} samples/s",
            f"eta {_duration(eta)}",
        ]
        if "eval_loss" in record:
            parts.insert(2, f"eval {record['eval_loss']:.4f}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def append_metrics(path, record: dict) -> None:
    with open(path, "ab") as f:
        f.write(orjson.dumps(record) + b"\n")


def train(
    state: TrainState,
    loader: Iterator[Any],
    *,
    steps: int,
    device: torch.device,
    log_every: int,
    on_log: Callable[[dict], None],
    snapshot_every: int | None,
    on_snapshot: Callable[[TrainState], None],
    eval_every: int | None = None,
    eval_loss: Callable[[TrainState], torch.Tensor] | None = None,
    poll: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainState:
    """Run the step until `state.step == steps`, with the side effects at their steps.

    Side effects depend on the step number only, so an interrupted and resumed run does
    exactly what an unbroken one does (eval updates `stats.best_eval`). `poll` runs before
    every step (an async snapshot writer raises its error there). `should_stop` is asked
    after every step but the last (under torchrun all ranks must answer alike); when it says
    yes the loop snapshots that step, if it was not a snapshot step anyway, and returns early.
    """
    t_last, samples_last = time.perf_counter(), int(state.data["samples"])
    while (now := int(state.step)) < steps:
        if poll is not None:
            poll()
        batch = to_device(next(loader), device)
        state = run_step(state, batch)
        now += 1
        record = None
        eval_now = bool(eval_every and eval_loss and (now % eval_every == 0 or now == steps))
        if now % log_every == 0 or now == steps or eval_now:
            samples = int(state.data["samples"])
            t = time.perf_counter()
            record = {
                "step": now,
                "loss": state.metrics["loss"].item(),  # already the mean over ranks
                "lr": state.metrics["lr"].item(),
                "grad_norm": state.metrics["grad_norm"].item(),
                "samples_per_s": (samples - samples_last) / max(t - t_last, 1e-9),
            }
            t_last, samples_last = t, samples
        if eval_now:
            value = eval_loss(state)
            best = state.stats["best_eval"]
            best.copy_(torch.minimum(best, value))
            record["eval_loss"] = value.item()
        if record is not None:
            on_log(record)
        stop = now < steps and should_stop()
        if (snapshot_every and now % snapshot_every == 0) or now == steps or stop:
            on_snapshot(state)
        if stop:
            break
    return state
