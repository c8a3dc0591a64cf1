"""Helpers for tests/test_reliability.py: the fork-server client and run-directory checks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import torch
from hypothesis import strategies as st
from tensordict import TensorDict

from functrain import checkpoint, cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
#: tiny.yaml cut to seconds: 10 steps of 4 samples, a snapshot every 2 steps, a log every step.
FAST = (
    "steps=10",
    "checkpoint.every=2",
    "log_every=1",
    "data.batch_size=4",
    "step.0.micro_batches=1",
    "eval.batches=1",
)
STEPS = 10


class Server:
    """Client of tests/_rel_forkserver.py: runs `functrain ARGV` in forked children."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.n = logs, 0
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("FUNCTRAIN_TRACE", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_rel_forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, *argv, env=None, actions=(), timeout: float = 120) -> dict:
        """Run one command; the reply gets `log`: the child's stdout and stderr together."""
        self.n += 1
        log = self.logs / f"{self.n:03d}.log"
        request = dict(
            argv=[str(a) for a in argv],
            env=env or {},
            log=str(log),
            timeout=timeout,
            actions=[[str(x) if isinstance(x, Path) else x for x in a] for a in actions],
        )
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        reply["log"] = log.read_text(errors="replace") if log.exists() else ""
        assert not reply.get("timeout"), f"{argv} timed out:\n{reply['log']}"
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def inspect_json(path: Path) -> tuple[int, dict]:
    """`functrain inspect PATH --json`, in this process (it reads files only)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["inspect", str(path), "--json"])
    return code, (orjson.loads(out.getvalue()) if out.getvalue() else {"stderr": err.getvalue()})


def digests(snapshot: Path) -> dict:
    code, report = inspect_json(snapshot)
    assert code == 0 and report["valid"], report
    return report["digests"]


def tree(path: Path) -> dict:
    """Every file under `path` with its size and mtime: to prove nothing changed (but the
    `.lock` file, which names the last process that owned the directory, refused or not)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def snapshot_steps(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_snapshots(run)]


def assert_all_listed_valid(run: Path) -> None:
    """No partial or damaged snapshot is ever listed."""
    for _, snap in checkpoint.list_snapshots(run):
        assert checkpoint.verify(snap) == [], snap


def leftovers(run: Path) -> list[str]:
    return (
        sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp-")) if run.exists() else []
    )


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE = {  # how to damage a snapshot, the file it names, what inspect and resume must say
    "bit flip": (lambda s: flip_bit(s / "params.bin"), "params.bin", "checksum mismatch"),
    "truncated": (lambda s: truncate(s / "opt.bin"), "opt.bin", "(truncated?)"),
    "missing file": (lambda s: (s / "rng.bin").unlink(), "rng.bin", "is missing"),
    "bad manifest": (
        lambda s: (s / "manifest.json").write_bytes(b'{"format_version": 1, "step": '),
        "manifest.json",
        "not valid JSON",
    ),
    "no manifest": (lambda s: (s / "manifest.json").unlink(), "manifest.json", "is missing"),
}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshots(run: Path, steps) -> None:
    for s in steps:
        checkpoint.save(run / f"state_{s}", TensorDict({"x": torch.tensor(s)}, []), {"step": s})


KEYS = (
    "steps", "seed", "device", "name", "log_every", "model.n_layer", "model.dropout",
    "model._component_", "data.shuffle", "data.dataset.val_fraction", "data.dataset.max_bytes",
    "data.dataset._component_", "optim.lr", "optim.weight_decay", "optim._component_",
    "schedule.warmup_steps", "schedule._component_", "step.1.max_norm", "step.3",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.keep_every", "checkpoint.on_error",
    "checkpoint.signal", "checkpoint.async", "eval.every", "eval.batches", "nope", "model.nope",
    "checkpoint", "data",
)  # fmt: skip
VALUES = (
    "0", "-1", "1", "2", "3", "7", "64", "1.5", "1e-3", "nan", ".inf", "true", "null", "''",
    "abc", "[]", "{}", "[1, 2]", "{a: 1}", "SIGUSR1", "SIGKILL", "continue", "cpu", "cuda",
    "functrain.models.GPT", "no.such.thing", "os.getcwd", "'[", "{", "a=b", "",
)  # fmt: skip
# Sizes that must fit each other. Known gap (models/build own it): well-typed values that do
# not fit (vocab_size < 256, n_head=0, model.block_size < the data's, a batch that does not
# split into micro-batches) pass validation and fail in the first step with a traceback, after
# the run directory was made. Until build checks the fit, they are fuzzed with ill-typed
# values only.
FIT_KEYS = (
    "model.vocab_size", "model.block_size", "model.n_head", "model.n_embd", "data.batch_size",
    "data.dataset.block_size", "step.0.micro_batches",
)  # fmt: skip
ILL_TYPED = ("1.5", "abc", "[]", "{}", "true", "''", "nan")
OVERRIDE = st.one_of(
    st.builds("{}={}".format, st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.builds("{}={}".format, st.sampled_from(FIT_KEYS), st.sampled_from(ILL_TYPED)),
    st.text(max_size=12),
)
