"""Run directories: create them, check a resume against them, keep `metrics.jsonl` in step.

runs/<name>/recipe.yaml  metrics.jsonl  state_<step>/

The snapshots inside are `functrain.checkpoint.Snapshots`'s business; this module keeps the
rest of the directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import torch

from functrain import checkpoint
from functrain.data import fingerprint_changes
from functrain.errors import RunError
from functrain.recipe import Recipe, diff, dump_yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
#: Recipe keys that change no bit of training: they may differ on resume without --allow-change.
FREE_KEYS = (
    "name", "out_dir", "checkpoint", "log_every", "log", "data.num_workers", "data.replay"
)  # fmt: skip


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


def _is_free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def _is_allowed(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_resume(
    manifest: dict[str, Any],
    *,
    recipe: dict,
    fingerprint: dict,
    allow: list[str],
    environment: dict,
) -> tuple[list[str], list[str]]:
    """Refuse what would break exactness; return (changes allowed, warnings).

    A recipe key that changed is an error unless listed in `allow` (a key or a prefix);
    a changed data fingerprint is always an error; other versions or devices warn.
    """
    changes = [c for c in diff(manifest["recipe"], recipe) if not _is_free(c[0])]
    refused = [c for c in changes if not _is_allowed(c[0], allow)]
    problems = [f"  {k}: {_show(old)} -> {_show(new)}" for k, old, new in refused]
    if problems:
        raise RunError(
            "the recipe differs from the snapshot's, which would break exact resume:\n"
            + "\n".join(problems)
            + "\nRestore those values, or accept each change with --allow-change KEY "
            "(e.g. --allow-change " + refused[0][0] + ")."
        )
    data_changes = fingerprint_changes(manifest["data"], fingerprint)
    if data_changes:
        raise RunError(
            "the training data differs from the snapshot's:\n  "
            + "\n  ".join(data_changes)
            + "\nResume with the data the run was trained on (data.dataset in the recipe)."
        )
    warnings = [
        f"{what} differs: snapshot {manifest_value} vs now {environment[what]}; results may "
        "not be bitwise identical to an unbroken run"
        + (
            f" (run with OMP_NUM_THREADS={manifest_value} for the same bits)"
            if what == _THREADS
            else ""
        )
        for what, manifest_value in _environment_of(manifest).items()
        if manifest_value != environment[what]
    ]
    allowed = [f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in changes]
    return allowed, warnings


def _environment_of(manifest: dict) -> dict:
    versions = manifest.get("versions", {})
    found = {
        "torch version": versions.get("torch"),
        "functrain version": versions.get("functrain"),
        "python version": versions.get("python"),
        "device": manifest.get("device"),
    }
    if manifest.get("device") == "cpu" and "cpu_threads" in manifest:
        found[_THREADS] = manifest["cpu_threads"]
    return found


#: torch's intra-op threads split CPU reductions (a bias's gradient, a norm) into as many
#: partial sums, so their count is part of what a CPU run's bits depend on. torchrun sets
#: OMP_NUM_THREADS=1 for several processes per node, a plain process uses every core.
_THREADS = "CPU threads (OMP_NUM_THREADS)"


def environment(device: str) -> dict:
    """This process's versions and device, in the terms of `_environment_of`."""
    versions = checkpoint.versions()
    return {
        "torch version": versions["torch"],
        "functrain version": versions["functrain"],
        "python version": versions["python"],
        "device": device,
        _THREADS: torch.get_num_threads(),
    }


def _show(value: Any) -> str:
    return orjson.dumps(value).decode() if not isinstance(value, str) else value


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
