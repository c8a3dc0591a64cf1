"""Helpers of the torchrun tests (test_dist.py, test_fsdp.py): launch, traces, snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
from conftest import timeless_metrics  # noqa: F401 -- re-exported for the torchrun tests

from functrain import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def _env(trace: Path | None, timeout: int = 120) -> dict:
    """The environment of a launch. The collective timeout leaves room for a slow start of
    3 ranks on 2 cores; the kill test lowers it to bound the time a dead rank may cost."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FUNCTRAIN_DIST_TIMEOUT": str(timeout)}
    env.pop("FUNCTRAIN_TRACE", None)
    if trace is not None:
        env["FUNCTRAIN_TRACE"] = str(trace)
    return env


def _torchrun_cmd(nproc: int, target: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a port the OS assigns: no race for a free port
        f"--nproc_per_node={nproc}",
        *target,
    ]


def launch(nproc: int, *args, trace: Path | None = None, script: Path | None = None, check=True):
    """`functrain ARGS` in 1 plain process or under torchrun with `nproc` ranks."""
    target = [str(script)] if script else ["-m", "functrain"]
    cmd = _torchrun_cmd(nproc, target) if nproc > 1 else [sys.executable, *target]
    out = subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=_env(trace), timeout=300
    )
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def trace(directory: Path) -> list[tuple[int, list[str]]]:
    """(global cursor, digests of the global batch) per step, ranks' slices joined in order."""
    files = sorted(directory.glob("rank*.jsonl"))
    per_rank = [[orjson.loads(line) for line in f.read_bytes().splitlines()] for f in files]
    world = per_rank[0][0]["world_size"]
    assert len(files) == world
    records = [[r for r in rows if "samples" in r] for rows in per_rank]
    steps = list(zip(*records, strict=True))
    assert all(len({r["samples"] for r in rs}) == 1 for rs in steps)  # ranks in lockstep
    return [(rs[0]["samples"], [d for r in rs for d in r["rows"]]) for rs in steps]


def metrics(run: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]


def params(snapshot: Path) -> dict:
    tensors, _ = checkpoint.load(snapshot)
    return dict(tensors["params"].items(include_nested=True, leaves_only=True))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def digests(snapshot: Path) -> dict:
    """The per-entry content digests `functrain inspect --json` prints (in-process: faster)."""
    assert not checkpoint.verify(snapshot)
    return checkpoint.digests(snapshot)


def rank_pid(trace: Path, rank: int, cursor: int, proc, deadline: float) -> int:
    """The pid of `rank` once its trace shows it training at global `cursor`."""
    path = trace / f"rank{rank}.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and b'"samples":%d,' % cursor in (lines := path.read_bytes()):
            return orjson.loads(lines.splitlines()[0])["pid"]
        time.sleep(0.005)
    raise AssertionError(f"rank {rank} never reached cursor {cursor}: exit {proc.poll()}")
