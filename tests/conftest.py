"""Shared small fixtures: a toy classification problem and state builders."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from tensordict import TensorDict

import functrain as ft
from functrain import checkpoint
from functrain.losses import cross_entropy
from functrain.models import MLP


def toy_data(n: int = 256, features: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def toy_model(dropout: float = 0.1, seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(in_features=16, hidden=32, classes=4, depth=2, dropout=dropout)


class Tied(torch.nn.Module):
    """An embedding whose output head is the same tensor (`head.weight = emb.weight`): a tied
    weight under two names."""

    def __init__(self, vocab: int = 4, dim: int = 3, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim, dtype=dtype)
        self.head = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def make_state(model=None, *, optimizer=None, transforms=None, schedule=None, seed=0):
    model = copy.deepcopy(model) if model is not None else toy_model()
    return ft.create(
        model,
        loss=cross_entropy(),
        optimizer=optimizer or ft.adamw(lr=1e-2, weight_decay=0.1),
        transforms=transforms or [ft.forward_backward(), ft.apply_optimizer()],
        schedule=schedule,
        seed=seed,
    )


def assert_states_equal(a: TensorDict, b: TensorDict) -> None:
    """Every leaf of every entry bitwise equal (NaN metrics compare as equal)."""
    la = dict(a.items(include_nested=True, leaves_only=True))
    lb = dict(b.items(include_nested=True, leaves_only=True))
    assert la.keys() == lb.keys()
    for k in la:
        x, y = la[k].detach(), lb[k].detach()
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)), f"{k} differs"
        assert torch.equal(torch.isnan(x), torch.isnan(y)) if x.is_floating_point() else True, k


@pytest.fixture
def data():
    return toy_data()


@pytest.fixture(scope="module")
def threads_one():
    """One OpenMP thread per torchrun worker while a module's processes run (2 cores here)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = old


def cli(*args, cwd=None, check=True, env=None) -> subprocess.CompletedProcess:
    """`python -m functrain ARGS` in a subprocess; with `check`, a non-zero exit fails."""
    out = subprocess.run(
        [sys.executable, "-m", "functrain", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def timeless_metrics(run) -> list[dict]:
    """A run's metrics.jsonl without samples_per_s, the one field the wall clock sets."""
    rows = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def wait_for_snapshot(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `run` holds a snapshot of `step` or later, while `proc` (writing it) lives."""
    end = time.monotonic() + timeout
    while not any(s >= step for s, _ in checkpoint.list_snapshots(run)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no snapshot of step {step} or later in {run}"
        time.sleep(0.05)


def rewrite_manifest(snap: Path, manifest: dict) -> None:
    """Write `manifest` as the snapshot's, with its digest made to match (a forgery, or an
    edit made to test what lies beyond the digest check)."""
    from functrain.checkpoint.manifest import MANIFEST, MANIFEST_DIGEST, seal

    body = orjson.dumps(manifest)
    (snap / MANIFEST).write_bytes(body)
    (snap / MANIFEST_DIGEST).write_bytes(seal(body))


def assert_branch_resumes_bitwise(out, recipe, *args, env=None, at=6, end=12):
    """Run A of `recipe` to step `end`, then resume it from `state_<at>` in a new process as
    the branch B; B's last snapshot (every entry) and metrics must be A's. Returns (A, B,
    the resume's CompletedProcess)."""
    cli("run", recipe, f"out_dir={out}", "name=A", *args, env=env)
    res = cli("resume", recipe, f"out_dir={out}", "name=A", *args,
              "--from", f"state_{at}", "--name", "B", env=env)  # fmt: skip
    a, b = out / "A", out / "B"
    assert checkpoint.digests(b / f"state_{end}") == checkpoint.digests(a / f"state_{end}")
    assert timeless_metrics(b) == timeless_metrics(a)
    return a, b, res


# ---------------------------------------------------------------- no silent skips in CI

#: Set by the nox test session, which installs every extra and runs as root on Linux: a
#: test that skips there for any reason but a missing GPU is a check that silently vanished.
STRICT_SKIPS = "FUNCTRAIN_STRICT_SKIPS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(STRICT_SKIPS) == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if "CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under {STRICT_SKIPS}=1 (only a missing CUDA GPU may skip a test "
                f"here): {reason}"
            )
