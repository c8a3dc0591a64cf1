"""What a run shows and records: one progress line, and `metrics.jsonl`."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import orjson

__all__ = ["Progress", "append_metrics"]


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


def append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to the run's `metrics.jsonl`."""
    with open(path, "ab") as f:
        f.write(orjson.dumps(record) + b"\n")
