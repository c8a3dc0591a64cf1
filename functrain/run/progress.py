"""What a run shows and records: a progress bar, and `metrics.jsonl`.

On a terminal, a tqdm bar (step/total, ETA) with the latest loss, eval loss, LR, samples/s
and tokens/s; whatever is written to stderr meanwhile (warnings, the preemption message)
appears on its own line above the bar. When stdout is not a terminal (a log file, a
scheduler's capture), one plain line per logged step instead, which greps and tails well.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson
import torch
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from functrain.errors import RunError
from functrain.run import rundir

__all__ = ["Progress", "append_metrics", "tokens_per_sample"]


class Progress:
    """The run's progress on `stream` (stdout): a bar on a terminal, plain lines otherwise.

    `tokens` (per sample, see `tokens_per_sample`) adds tokens/s. While the bar is up,
    `sys.stderr` writes go above it, a line at a time; `close` takes the bar down."""

    def __init__(
        self, total: int, start: int, stream: TextIO | None = None, tokens: int | None = None
    ) -> None:
        self.total, self.start, self.tokens = total, start, tokens
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._bar: tqdm | None = None
        self._stderr: TextIO | None = None  # the real one, while the bar holds sys.stderr

    def update(self, record: dict) -> None:
        parts = [f"loss {record['loss']:.4f}"]
        if "eval_loss" in record:
            parts.append(f"eval {record['eval_loss']:.4f}")
            parts += [
                f"{k.removeprefix('eval_')} {v:.4g}"
                for k, v in record.items()
                if k.startswith("eval_") and k != "eval_loss"
            ]
        parts += [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("train_")]
        parts += [f"lr {record['lr']:.3g}", f"{record['samples_per_s']:.1f} samples/s"]
        if self.tokens:
            parts.append(f"{record['samples_per_s'] * self.tokens:,.0f} tokens/s")
        if self.tty:
            bar = self._bar or self._open()
            bar.set_postfix_str(" | ".join(parts), refresh=False)
            bar.update(record["step"] - bar.n)
            return
        done = record["step"] - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - record["step"]) if done else float("nan")
        line = " | ".join([f"step {record['step']}/{self.total}", *parts, f"eta {_eta(eta)}"])
        self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (above the bar while it is up)."""
        if self._bar is not None:
            self._bar.clear()
            self.stream.write(text + "\n")
            self._bar.refresh()
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._stderr is not None:
            sys.stderr.flush()  # a last line without its newline
            sys.stderr, self._stderr = self._stderr, None

    def _open(self) -> tqdm:
        self._bar = tqdm(
            total=self.total,
            initial=self.start,
            file=self.stream,
            unit="step",
            dynamic_ncols=True,
        )
        self._stderr, sys.stderr = sys.stderr, _AboveBar(sys.stderr, self._bar)
        return self._bar


class _AboveBar:
    """A stream that writes whole lines above a tqdm bar: clear the bar, write, redraw."""

    def __init__(self, stream: TextIO, bar: tqdm) -> None:
        self._stream, self._bar, self._pending = stream, bar, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, self._pending = self._pending.rsplit("\n", 1)
            self._bar.clear()
            self._stream.write(lines + "\n")
            self._stream.flush()
            self._bar.refresh()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.write("\n")
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def tokens_per_sample(batch: Any) -> int | None:
    """Tokens in one sample of a language-model batch: the length of its first integer
    tensor of rank >= 2 (token ids `[B, T]`); None for other batches."""
    for t in tree_flatten(batch)[0]:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point():
            return math.prod(t.shape[1:])
    return None


def _eta(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to the run's `metrics.jsonl`; a failed write (a full disk) is cut
    off again, so no torn line is left, and is a `RunError` naming the file and the space."""
    line = memoryview(orjson.dumps(record) + b"\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise RunError(rundir.io_problem(path, err, len(line), then=_RESUME)) from err
    try:
        size, done = os.fstat(fd).st_size, 0
        while done < len(line):
            done += os.write(fd, line[done:])
    except OSError as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise RunError(rundir.io_problem(path, err, len(line), then=_RESUME)) from err
    finally:
        os.close(fd)


_RESUME = (
    "resume the run (functrain resume RECIPE --from latest, or the same --auto-resume command)"
)
