"""Data parallel for real: `torchrun --nproc_per_node=2` on CPU with gloo, no mocks.

Runs are traced (FUNCTRAIN_TRACE, see functrain/distributed/trace.py): each rank records a digest of
every sample it trains on, so runs at different world sizes are compared sample by sample.

Why 1 rank vs 2 ranks is close and not bitwise: with 2 ranks each rank averages the
gradient of its half batch and the all-reduce averages the two, while 1 rank averages over
the whole batch at once; the float sums run in another order (and the loss is a mean of
per-rank means). The differences are ~1e-7 relative per step; AdamW amplifies them where
the second moment is tiny, so after 12 steps params differ by ~3e-6 while training moved
them by ~3e-2. Tolerance: 1e-4. Dropout masks are drawn per rank, so these runs use
dropout=0; the 2 -> 2 resume keeps dropout and is bitwise.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import orjson
import pytest
import torch
from _dist_common import (
    ROOT,
    TINY,
    _env,
    _torchrun_cmd,
    digests,
    launch,
    max_diff,
    metrics,
    params,
    rank_pid,
    timeless_metrics,
    trace,
)

from functrain import checkpoint
from functrain.checkpoint.faults import SLOW_SAVE_ENV
from functrain.distributed.reduce import _buckets

NO_DROPOUT = ("model.dropout=0.0", "steps=12", "checkpoint.every=6", "log_every=1")
NO_DROPOUT += ("eval.every=6", "eval.batches=1", "data.num_workers=0")
PARAMS_ATOL = 1e-4
FUNCTRAIN_FRAME = re.compile(r'File "[^"]*functrain/')


# -- 1 rank vs 2 ranks, and resumes across world sizes ------------------------------------


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """An unbroken run at 1 and at 2 ranks (same recipe, dropout off), both traced."""
    out = tmp_path_factory.mktemp("cross")
    for nproc, name in ((1, "one"), (2, "two")):
        res = launch(
            nproc, "run", TINY, f"out_dir={out}", f"name={name}", *NO_DROPOUT,
            trace=out / f"trace_{name}",
        )  # fmt: skip
        (out / f"{name}.stdout").write_text(res.stdout)
    return out


def test_two_ranks_see_the_global_batches_and_lr_of_one(cross):
    one, two = trace(cross / "trace_one"), trace(cross / "trace_two")
    assert [s for s, _ in one] == list(range(0, 96, 8)) and all(len(r) == 8 for _, r in one)
    assert two == one  # every step, every sample, in order
    m1, m2 = metrics(cross / "one"), metrics(cross / "two")
    assert [r["step"] for r in m2] == list(range(1, 13))  # rank 0 alone writes metrics
    assert [r["lr"] for r in m2] == [r["lr"] for r in m1]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(m1, m2, strict=True)) < 1e-5
    p1, p2 = params(cross / "one" / "state_12"), params(cross / "two" / "state_12")
    p0 = params(cross / "one" / "state_6")
    assert max_diff(p1, p2) < PARAMS_ATOL < max_diff(p1, p0)  # close, and training moved them
    stdout = (cross / "two.stdout").read_text()
    assert stdout.count("step 12/12") == 1 and stdout.count("done:") == 1  # rank 0 prints


def test_resume_across_world_sizes_keeps_samples_and_lr(cross):
    runs = [
        (1, "two", "two_to_one"),  # a 2-rank snapshot resumed by 1 process
        (2, "one", "one_to_two"),  # and the reverse
    ]
    for nproc, source, name in runs:
        res = launch(
            nproc, "resume", TINY, f"out_dir={cross}", f"name={source}", *NO_DROPOUT,
            "--from", "state_6", "--name", name, trace=cross / f"trace_{name}",
        )  # fmt: skip
        assert "written by" in res.stderr and "close to, not bitwise" in res.stderr
        resumed = trace(cross / f"trace_{name}")
        assert resumed == trace(cross / f"trace_{source}")[6:]  # global batches 6..11
        assert metrics(cross / name) == metrics(cross / source)[:6] + metrics(cross / name)[6:]
        assert [r["lr"] for r in metrics(cross / name)] == [r["lr"] for r in metrics(cross / "one")]
        final = params(cross / name / "state_12")
        for unbroken in ("one", "two"):
            assert max_diff(final, params(cross / unbroken / "state_12")) < PARAMS_ATOL


# -- 2 -> 2: a rank killed mid-run, resumed bitwise ---------------------------------------

KILL_RUN = ("steps=40", "checkpoint.every=10", "log_every=5", "eval.every=20", "eval.batches=1")


def test_killed_rank_ends_the_job_and_resume_is_bitwise(tmp_path):
    launch(2, "run", TINY, f"out_dir={tmp_path}", "name=full", *KILL_RUN)
    args = ["run", str(TINY), f"out_dir={tmp_path}", "name=cut", *KILL_RUN]
    proc = subprocess.Popen(
        _torchrun_cmd(2, ["-m", "functrain"]) + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(tmp_path / "trace_cut", timeout=30),
    )
    try:
        # Rank 1 taking batch 13 means rank 0 has published state_10 (a collective after it).
        pid = rank_pid(tmp_path / "trace_cut", 1, 13 * 8, proc, time.monotonic() + 120)
        os.kill(pid, signal.SIGSTOP)  # freeze it first: the job cannot finish behind our back
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    assert b"SIGKILL" in stderr and not FUNCTRAIN_FRAME.search(stderr.decode())
    cut = tmp_path / "cut"
    assert not (cut / "state_40").exists() and (cut / "state_10").exists()
    res = launch(
        2, "resume", TINY, f"out_dir={tmp_path}", "name=cut", *KILL_RUN, "--from", "latest"
    )
    assert "step 40/40" in res.stdout
    full = digests(tmp_path / "full" / "state_40")
    assert digests(cut / "state_40") == full
    assert {"params", "opt", "rng", "data", "stats"} <= full.keys()

    assert timeless_metrics(cut) == timeless_metrics(tmp_path / "full")
    assert [r["step"] for r in metrics(cut)] == list(range(5, 41, 5))


# -- every rank agrees, or every rank stops with one clear error --------------------------

FAULT = ROOT / "tests" / "_dist_fault.py"


def _assert_clean_failure(res, message: str) -> None:
    """torchrun failed because a rank exited 2; the message printed once; no functrain frames."""
    assert res.returncode != 0
    assert res.stderr.count(message) == 1, res.stderr
    assert "exitcode  : 2" in res.stderr
    assert not FUNCTRAIN_FRAME.search(res.stderr), res.stderr


def test_ranks_disagreeing_on_the_recipe_all_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNCTRAIN_FAULT", "override:optim.lr=0.01")
    res = launch(2, "run", TINY, f"out_dir={tmp_path}", script=FAULT, check=False)
    _assert_clean_failure(res, "the ranks disagree on the recipe hash")
    assert "functrain run: error:" in res.stderr and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("fault", ["load", "read"])
def test_a_failed_load_on_one_rank_stops_all(cross, monkeypatch, fault):
    """Rank 1 alone cannot read the snapshot: when checking it, or (`read`) once checked,
    reading it into the state the trial step spent. Every rank stops with its message."""
    monkeypatch.setenv("FUNCTRAIN_FAULT", fault)
    args = ("resume", TINY, f"out_dir={cross}", "name=two", *NO_DROPOUT, "--from", "state_6")
    res = launch(2, *args, "--name", "fault", script=FAULT, check=False)
    _assert_clean_failure(res, "on rank 1: state_6 is unreadable here")
    assert not (cross / "fault").exists()


ASYNC_FAIL = ("steps=12", "checkpoint.every=4", "checkpoint.async=true", "log_every=4")


@pytest.mark.parametrize(("on_error", "codes"), [("stop", "22"), ("continue", "00")])
def test_a_failed_async_write_on_rank_0_reaches_every_rank(tmp_path, monkeypatch, on_error, codes):
    """With ddp only rank 0 writes, in the background; when that write fails, every rank
    learns of it at the next step and all stop alike (exit 2, one message), or all train on."""
    monkeypatch.setenv("FUNCTRAIN_TEST_SAVE_ERROR", "ENOSPC:state_4")
    monkeypatch.setenv("FUNCTRAIN_CODES", str(tmp_path))
    res = launch(
        2, "run", TINY, f"out_dir={tmp_path}", *ASYNC_FAIL, f"checkpoint.on_error={on_error}",
        script=ROOT / "tests" / "_dist_codes.py",
    )  # fmt: skip
    assert (tmp_path / "rank0.code").read_text() + (tmp_path / "rank1.code").read_text() == codes
    said = f"could not write snapshot {tmp_path / 'tiny' / 'state_4'}"
    assert res.stderr.count(said) == 1, res.stderr
    assert "another rank died" not in res.stderr
    assert not FUNCTRAIN_FRAME.search(res.stderr), res.stderr
    kept = [s for s, _ in checkpoint.list_snapshots(tmp_path / "tiny")]
    assert kept == ([] if on_error == "stop" else [8, 12])


# -- the all-reduce itself ----------------------------------------------------------------


def test_all_reduce_grads_averages_mixed_dtypes_in_place(tmp_path):
    launch(2, tmp_path, script=ROOT / "tests" / "_dist_worker.py")
    reports = [orjson.loads((tmp_path / f"rank{r}.json").read_bytes()) for r in (0, 1)]
    assert reports[0] == reports[1]
    got = reports[0]
    # rank r sent (r + 1) * arange: the mean is 1.5 * arange, exact in every dtype
    expected = {"a": 12, "b": 5, "c": 4, "d": 7}
    dtypes = {"a": "float32", "b": "float64", "c": "bfloat16", "d": "float32"}
    for name, n in expected.items():
        assert got["grads"][name] == [f"torch.{dtypes[name]}", [1.5 * i for i in range(n)]]
    assert got["same_objects"] and got["loss"] == 1.5
    assert got["buffers"] == {"count": [1], "stat": [1.0, 1.0, 1.0]}  # rank 0's


def test_buckets_group_by_dtype_within_the_size_limit():
    f32 = [torch.zeros(4) for _ in range(3)]  # 16 bytes each
    f64, bf16 = torch.zeros(2, dtype=torch.float64), torch.zeros(8, dtype=torch.bfloat16)
    tensors = [f32[0], f64, f32[1], bf16, f32[2]]
    ids = [[id(t) for t in b] for b in _buckets(tensors, limit=32)]
    assert ids == [[id(f32[0]), id(f32[1])], [id(f32[2])], [id(f64)], [id(bf16)]]
    big = _buckets([torch.zeros(100), torch.zeros(1)], limit=32)  # an oversized tensor alone
    assert [len(b) for b in big] == [1, 1]
    assert len(_buckets(tensors, limit=1 << 20)) == 3  # one bucket per dtype


LEAVING = """
import atexit, sys, threading, time
from functrain import distributed
atexit.register(lambda: print("atexit ran", flush=True))
def late():
    time.sleep(0.3)
    print("thread done")
threading.Thread(target=late).start()
sys.stdout.write("buffered ")
distributed.leave(7)
print("not reached")
"""


def test_a_worker_leaves_with_its_code_after_threads_exit_functions_and_flush():
    """A torchrun worker ends through `distributed.leave`, skipping the C++ teardown that
    may abort on a gloo group DTensor's caches keep alive: what Python's own shutdown does
    must still happen first (a snapshot write's thread finishes, atexit runs, stdout is
    flushed), and the status is the one given."""
    out = subprocess.run(
        [sys.executable, "-c", LEAVING], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 7, out.stderr
    assert out.stdout.split("\n")[:3] == ["buffered thread done", "atexit ran", ""], out.stdout


def test_a_snapshot_write_longer_than_the_collective_timeout_holds_no_rank_past_it(tmp_path):
    """Rank 0 alone writes an unsharded snapshot while rank 1 waits for its outcome: on a
    gloo group of its own with the write timeout (hours), not the process group's (here
    8 s). A write slowed to about 16 s ends well; on the process group it timed out."""
    cmd = _torchrun_cmd(2, ["-m", "functrain", "run", str(TINY), f"out_dir={tmp_path}"])
    cmd += ["name=w", "steps=2", "schedule.warmup_steps=1", "checkpoint.every=2"]
    cmd += ["eval.every=null", "log_every=1"]
    env = {**_env(None, timeout=8), SLOW_SAVE_ENV: "1.5"}  # 11 files: 16.5 s
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - start > 16
    assert checkpoint.verify(tmp_path / "w" / "state_2") == []
