"""One owner per run directory, and a full disk: a second `run` or `resume` of a directory in
use is refused naming its owner, a dead owner's lock is taken over, a run directory is made
atomically, and a write that finds the disk full says so, leaves no temp file and no
half-made run directory — run for real: processes started and killed, a small tmpfs filled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import cli, wait_for_snapshot

import functrain as ft
from functrain import checkpoint
from functrain.run import rundir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
QUIET = ["eval.every=null", "log_every=5"]


def _start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "functrain", "run", str(TINY), f"out_dir={out}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _steps(run: Path) -> list[int]:
    return [orjson.loads(line)["step"] for line in (run / "metrics.jsonl").read_bytes().split()]


def test_a_second_run_or_resume_of_a_directory_in_use_is_refused_naming_the_owner(tmp_path):
    first = _start(tmp_path, "steps=100000", "checkpoint.every=20", "checkpoint.keep_last=2",
                   *QUIET)  # fmt: skip
    try:
        run = tmp_path / "tiny"
        wait_for_snapshot(run, 20, first)
        cli("run", TINY, f"out_dir={tmp_path}", "name=other", "steps=100000",
            "checkpoint.every=5", *QUIET, "--until", "5")  # fmt: skip
        for args in (["resume", TINY, f"out_dir={tmp_path}", *QUIET, "steps=100000",
                      "checkpoint.every=20", "checkpoint.keep_last=2", "--from", "latest"],
                     ["run", TINY, f"out_dir={tmp_path}", *QUIET],
                     ["resume", TINY, f"out_dir={tmp_path}", "name=other", *QUIET,
                      "steps=100000", "checkpoint.every=5", "--from", "latest",
                      "--name", "tiny"]):  # a branch into it  # fmt: skip
            res = cli(*args, check=False)
            assert res.returncode == 2, res.stderr
            assert f"run directory {run} is in use by pid {first.pid} on host" in res.stderr
            assert "Traceback" not in res.stderr
        before = checkpoint.list_snapshots(run)[-1][0]
        wait_for_snapshot(run, before + 40, first)  # it trained on, unharmed
    finally:
        first.send_signal(signal.SIGTERM)  # a preemption: it writes its last snapshot
        first.communicate(timeout=120)
    snapshots = checkpoint.list_snapshots(run)
    assert len(snapshots) >= 2 and not list(run.glob("*.invalid*"))
    for _, path in snapshots:
        checkpoint.check(path)
    steps = _steps(run)
    assert steps == sorted(set(steps))  # one writer: every step once, in order
    # the owner is gone: its lock goes with it, and the next resume takes the directory over
    owner = orjson.loads((run / rundir.LOCK_FILE).read_bytes())
    assert owner["pid"] == first.pid
    last = snapshots[-1][0]
    cli("resume", TINY, f"out_dir={tmp_path}", *QUIET, "steps=100000", "checkpoint.every=20",
        "checkpoint.keep_last=2", "--from", "latest", "--until", str(last + 5))  # fmt: skip
    assert orjson.loads((run / rundir.LOCK_FILE).read_bytes())["pid"] != first.pid


def test_two_runs_of_one_name_started_together_train_one_run(tmp_path):
    args = ["steps=30", "checkpoint.every=10", *QUIET]
    procs = [_start(tmp_path, *args) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "is in use by" in refusal or "already exists" in refusal
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path / "tiny")] == [10, 20, 30]
    assert _steps(tmp_path / "tiny") == [5, 10, 15, 20, 25, 30]


def test_a_lock_on_a_file_system_without_locks_warns_and_refuses_a_live_owner_here(
    tmp_path, monkeypatch, capsys
):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    held = rundir.lock_run(tmp_path)
    assert "does not keep locks" in capsys.readouterr().err
    held.release()
    record = {"host": os.uname().nodename, "pid": os.getppid(), "since": "then"}
    (tmp_path / rundir.LOCK_FILE).write_bytes(orjson.dumps(record))
    with pytest.raises(rundir.InUseError, match="is in use by pid"):
        rundir.lock_run(tmp_path)


# ---------------------------------------------------------------- retention: this run's own


def test_retention_deletes_only_what_this_runs_lineage_wrote(tmp_path):
    """A snapshot another run wrote (copied in, or a second writer's) is never deleted by
    retention; this run's own are, across a resume (the run id goes on)."""
    args = [f"out_dir={tmp_path}", "steps=8", "checkpoint.every=2", "checkpoint.keep_last=1",
            *QUIET]  # fmt: skip
    cli("run", TINY, *args, "name=other", "--until", "2")
    cli("run", TINY, *args, "--until", "4")
    run = tmp_path / "tiny"
    assert [s for s, _ in checkpoint.list_snapshots(run)] == [4]
    mine = checkpoint.read_manifest(run / "state_4")["run_id"]
    theirs = checkpoint.read_manifest(tmp_path / "other" / "state_2")["run_id"]
    assert len(mine) == 16 and mine != theirs
    shutil.copytree(tmp_path / "other" / "state_2", run / "state_1")  # not this run's
    res = cli("resume", TINY, *args, "--from", "latest")
    assert [s for s, _ in checkpoint.list_snapshots(run)] == [1, 4, 8]  # 6 deleted, 4 resumed
    assert res.stderr.count(f"retention leaves {run / 'state_1'} alone") == 1
    assert checkpoint.read_manifest(run / "state_8")["run_id"] == mine  # the same run
    cli("resume", TINY, *args, "--from", "state_4", "--name", "branch")  # a new run: own id
    assert checkpoint.read_manifest(tmp_path / "branch" / "state_8")["run_id"] not in (mine, theirs)


def test_a_loop_of_your_own_keeps_its_run_id_across_a_restore(tmp_path):
    from conftest import make_state, toy_data

    x, y = toy_data(64)
    policy = checkpoint.Policy(every=1, keep_last=1)
    state = make_state()
    with checkpoint.Snapshots(tmp_path, policy) as snapshots:
        for i in range(2):
            state = ft.step(state, (x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8]))
            snapshots.maybe_save(state)
    with checkpoint.Snapshots(tmp_path, policy) as snapshots:  # a new process
        state, _ = snapshots.restore("latest", like=make_state())
        state = ft.step(state, (x[16:24], y[16:24]))
        snapshots.maybe_save(state)
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path)] == [3]  # its own, deleted


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: mount), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but `leave` bytes; return the filler file."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_run_that_finds_the_disk_full_leaves_nothing_and_runs_once_space_is_freed(small_disk):
    filler = _fill(small_disk, leave=0)
    args = ["run", TINY, f"out_dir={small_disk}", "steps=10", "checkpoint.every=10", *QUIET]
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr
    assert "the disk is full" in res.stderr and " free there" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-made run
    filler.unlink()
    cli(*args)  # not "already exists ... resume": there was nothing to resume
    assert [s for s, _ in checkpoint.list_snapshots(small_disk / "tiny")] == [10]


def test_a_snapshot_that_does_not_fit_names_the_space_and_leaves_no_temp_dir(small_disk):
    filler = _fill(small_disk, leave=160 << 10)  # the recipe and metrics fit, a snapshot not
    args = ["run", TINY, f"out_dir={small_disk}", "steps=10", "checkpoint.every=5", *QUIET]
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr  # a user error, as the docs say
    assert "could not write snapshot" in res.stderr and "the disk is full" in res.stderr
    assert " needed" in res.stderr and "Traceback" not in res.stderr
    run = small_disk / "tiny"
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    assert checkpoint.list_snapshots(run) == []
    filler.unlink()
    res = cli(*args, check=False)  # its metrics are kept: say so, not "resume"
    assert res.returncode == 2 and "holds no snapshot to resume from" in res.stderr


def test_metrics_that_no_longer_fit_end_the_run_in_one_paragraph_with_no_torn_line(small_disk):
    _fill(small_disk, leave=16 << 10)  # the recipe, the lock and a few metric lines fit
    args = ["run", TINY, f"out_dir={small_disk}", "steps=400", "checkpoint.every=400",
            "log_every=1", "eval.every=null"]  # fmt: skip
    res = cli(*args, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "could not write" in res.stderr and "metrics.jsonl" in res.stderr
    assert "the disk is full" in res.stderr and "resume" in res.stderr
    body = (small_disk / "tiny" / "metrics.jsonl").read_bytes()
    assert body.endswith(b"\n")  # the failed line was cut off again
    steps = [orjson.loads(line)["step"] for line in body.splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and 0 < len(steps) < 400


def test_an_export_that_does_not_fit_names_the_space_and_leaves_no_file(tmp_path, small_disk):
    cli("run", TINY, f"out_dir={tmp_path}", "steps=10", "checkpoint.every=10", *QUIET)
    _fill(small_disk, leave=16 << 10)  # less than the weights
    res = cli("export", tmp_path / "tiny" / "state_10", "--out", small_disk / "w.safetensors",
              check=False)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "could not write" in res.stderr and "the disk is full" in res.stderr
    assert " needed" in res.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no temp file left
    res = cli("export", tmp_path / "tiny" / "state_10", "--out", small_disk / "filler" / "w",
              check=False)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr  # under a file
    assert "could not write" in res.stderr


def test_a_torn_last_metrics_line_is_dropped_when_a_resume_cuts_the_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')  # a writer killed mid-line
    assert rundir.metrics_until(path, 5) == b'{"step": 1}\n{"step": 2}\n'


# ---------------------------------------------------------------- a lost manifest


def test_a_snapshot_whose_manifest_was_deleted_is_set_aside_and_inspect_exits_1(tmp_path):
    args = [f"out_dir={tmp_path}", "steps=12", "checkpoint.every=4", *QUIET]
    cli("run", TINY, *args, "--until", "8")
    run = tmp_path / "tiny"
    (run / "state_8" / "manifest.json").unlink()
    res = cli("inspect", run, check=False)
    assert res.returncode == 1 and "INVALID" in res.stdout
    res = cli("resume", TINY, *args, "--from", "latest")
    assert "skipping invalid snapshot" in res.stderr and "state_8" in res.stderr
    assert (run / "state_8.invalid").is_dir()
    assert [s for s, _ in checkpoint.list_snapshots(run)] == [4, 8, 12]
    assert cli("inspect", run).returncode == 0
