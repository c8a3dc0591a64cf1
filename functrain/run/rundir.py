"""Run directories: create them, tidy them, keep `metrics.jsonl` in step with the snapshots.

runs/<name>/recipe.yaml  metrics.jsonl  state_<step>/

The snapshots inside are `functrain.checkpoint.Snapshots`'s business; this module keeps the
rest of the directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson

from functrain import checkpoint
from functrain.errors import RunError
from functrain.recipe import Recipe, dump_yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"


def run_path(recipe: Recipe) -> Path:
    return Path(recipe.out_dir) / recipe.name


def create_run(recipe: Recipe, path: Path, *, metrics: bytes = b"") -> None:
    """Make the run directory with its resolved recipe; refuse to reuse an existing one."""
    if path.exists() and any(path.iterdir()):
        raise RunError(
            f"run directory {path} already exists. To continue it: functrain resume "
            f"<recipe> --from latest. To start afresh, pick another name (name=NEW) or "
            f"remove the directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / RECIPE_FILE, dump_yaml(recipe).encode())
    write_atomic(path / METRICS_FILE, metrics)


def write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def metrics_until(path: Path, step: int) -> bytes:
    """The lines of `metrics.jsonl` up to and including `step` (none after: no orphans)."""
    if not path.exists():
        return b""
    kept = [
        line
        for line in path.read_bytes().splitlines(keepends=True)
        if line.strip() and orjson.loads(line)["step"] <= step
    ]
    return b"".join(kept)


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a last line still being written is left out."""
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # a run appending right now: its record is not whole yet
    return [orjson.loads(line) for line in lines]


def cut_metrics(path: Path, step: int) -> None:
    write_atomic(path, metrics_until(path, step))


_TMP_FILE = re.compile(rf"\.tmp-(?:{re.escape(RECIPE_FILE)}|{re.escape(METRICS_FILE)})-(\d+)")


def clean_partial(run: Path) -> list[Path]:
    """Remove what interrupted writes left in `run` (snapshot temp dirs, temp files of
    `write_atomic`) by processes no longer alive; return what was removed."""
    removed = checkpoint.clean_partial(run)
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        match = _TMP_FILE.fullmatch(p.name)
        pid = int(match.group(1)) if match else 0
        if match and p.is_file() and pid != os.getpid() and not checkpoint.process_alive(pid):
            p.unlink()
            removed.append(p)
    return removed


def set_aside(snapshot: Path) -> Path:
    """Rename an invalid snapshot to `state_N.invalid[.K]`: kept for a look, never listed."""
    target, k = snapshot.with_name(snapshot.name + ".invalid"), 1
    while target.exists():
        k += 1
        target = snapshot.with_name(f"{snapshot.name}.invalid.{k}")
    os.rename(snapshot, target)
    return target
