"""Nothing lost, nothing corrupted: random SIGKILLs (mid-step and mid-save), preemption
signals, damaged snapshots, failed writes, retention, and fuzzed command lines.

Commands run in children forked from tests/_rel_forkserver.py (one `import torch` for the
whole file). The kill test is seeded: FUNCTRAIN_KILL_SEED and FUNCTRAIN_KILL_TRIALS rerun or
widen it; a failure names its seed and trial.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _dist_common import _env, _torchrun_cmd, rank_pid, timeless_metrics
from _rel_common import (
    DAMAGE,
    FAST,
    OVERRIDE,
    STEPS,
    TINY,
    Server,
    assert_all_listed_valid,
    dead_pid,
    digests,
    flip_bit,
    inspect_json,
    leftovers,
    snapshot_steps,
    snapshots,
    tree,
    truncate,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from functrain import cli
from functrain.checkpoint import Policy, Snapshots
from functrain.checkpoint.faults import SAVE_ERROR_ENV as _SAVE_ERROR_ENV
from functrain.checkpoint.faults import SLOW_SAVE_ENV as _SLOW_SAVE_ENV
from functrain.recipe import RecipeError, load_recipe
from functrain.run import rundir

SEED = int(os.environ.get("FUNCTRAIN_KILL_SEED", "20250501"))
TRIALS = int(os.environ.get("FUNCTRAIN_KILL_TRIALS", "30"))
SLOW = "0.04"  # seconds before each file of a save: most of a slow run is spent saving
RETAIN = ("checkpoint.keep_last=2", "checkpoint.keep_every=4")
FINAL = f"state_{STEPS}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("logs"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> dict:
    """Unbroken runs, with and without slow saves: the digests every other run must reach."""
    out = tmp_path_factory.mktemp("reference")
    seconds = {}
    for name, env in (("fast", {}), ("slow", {_SLOW_SAVE_ENV: SLOW})):
        res = server.run("run", TINY, f"out_dir={out}", f"name={name}", *FAST, *RETAIN, env=env)
        assert res["code"] == 0, res["log"]
        seconds[name] = res["seconds"]
        # keep_last=2 and keep_every=4 leave the multiples of 4 and the newest two.
        assert snapshot_steps(out / name) == [4, 8, STEPS]
    assert digests(out / "slow" / FINAL) == digests(out / "fast" / FINAL)
    assert timeless_metrics(out / "slow") == timeless_metrics(out / "fast")
    run = out / "fast"
    return {"digests": digests(run / FINAL), "metrics": timeless_metrics(run), "seconds": seconds}


# ------------------------------------------------------------------ 1. kill -9 at any moment


def _mid_save(run: Path) -> bool:
    """A kill left a temp dir of a snapshot newer than every published one."""
    newest = max(snapshot_steps(run), default=-1)
    tmp = [re.match(r"\.tmp-state_(\d+)-", n) for n in leftovers(run)]
    return any(m and int(m.group(1)) > newest for m in tmp)


def _kill_trial(server: Server, reference: dict, out: Path, trial: int) -> dict:
    """Run, SIGKILL at a random moment, resume (killing again at random) until finished."""
    rng = random.Random(f"{SEED}:{trial}")
    slow = rng.random() < 0.7
    env, span = ({_SLOW_SAVE_ENV: SLOW}, reference["seconds"]["slow"]) if slow else ({}, None)
    span = span or reference["seconds"]["fast"]
    run, args = out / f"t{trial}", (f"out_dir={out}", f"name=t{trial}", *FAST, *RETAIN)
    command, seen = ("run", TINY, *args), {"kills": 0, "mid_save": 0}
    for attempt in range(4):  # the first try is always killed, the last never
        kill = attempt == 0 or (attempt < 3 and rng.random() < 0.5)
        actions = [("sleep", rng.uniform(0, span)), ("signal", "SIGKILL")] if kill else []
        res = server.run(*command, env=env, actions=actions)
        if res["code"] == 0:
            break
        assert res["code"] == -signal.SIGKILL, res["log"]
        seen["kills"] += 1
        seen["mid_save"] += _mid_save(run)
        assert_all_listed_valid(run)
        if STEPS in snapshot_steps(run):  # killed after its last snapshot: the run is done
            rundir.clean_partial(run)  # what the next start would do
            break
        if not snapshot_steps(run):  # killed before any snapshot: nothing to resume
            if run.exists():
                res = server.run("resume", TINY, *args, "--from", "latest")
                assert res["code"] == 2 and "no valid snapshot" in res["log"], res["log"]
                shutil.rmtree(run)
            command = ("run", TINY, *args)
        else:
            command = ("resume", TINY, *args, "--from", "latest")
    assert leftovers(run) == [], "interrupted writes were not cleaned up"
    assert_all_listed_valid(run)
    assert {4, 8, STEPS} <= set(snapshot_steps(run))
    assert digests(run / FINAL) == reference["digests"]
    assert timeless_metrics(run) == reference["metrics"]
    return seen


def test_sigkill_at_random_moments_loses_and_corrupts_nothing(server, reference, tmp_path):
    totals = {"kills": 0, "mid_save": 0}
    for trial in range(TRIALS):
        try:
            seen = _kill_trial(server, reference, tmp_path, trial)
        except AssertionError as err:
            raise AssertionError(
                f"kill test failed at seed {SEED}, trial {trial} (rerun with "
                f"FUNCTRAIN_KILL_SEED={SEED}): {err}"
            ) from err
        totals = {k: totals[k] + seen[k] for k in totals}
    print(f"kill test: seed {SEED}, {TRIALS} trials, {totals}")
    assert totals["kills"] >= TRIALS
    assert totals["mid_save"] >= TRIALS // 6, f"too few kills landed mid-save: {totals}"


# ------------------------------------------------------------------ 2. preemption


@pytest.mark.parametrize(
    "sig, extra",
    [("SIGTERM", ()), ("SIGINT", ()), ("SIGUSR1", ("checkpoint.signal=SIGUSR1",))],
)
def test_signal_finishes_the_step_snapshots_and_resume_is_exact(
    server, reference, tmp_path, sig, extra
):
    args = (f"out_dir={tmp_path}", "name=p", *FAST, "checkpoint.every=null", *extra)
    run = tmp_path / "p"
    until = ("until", run / "metrics.jsonl", '"step":3,')
    res = server.run("run", TINY, *args, actions=[until, ("signal", sig)])
    assert res["code"] == 143, res["log"]
    [stop] = snapshot_steps(run)  # every=null: this snapshot exists only because of the signal
    assert 3 <= stop < STEPS
    assert f"stopped by {sig} after step {stop}; snapshot {run / f'state_{stop}'}" in res["log"]
    assert timeless_metrics(run)[-1]["step"] == stop  # the step it was in finished, and was logged
    res = server.run("resume", TINY, *args, "--from", "latest")
    assert res["code"] == 0, res["log"]
    assert digests(run / FINAL) == reference["digests"]
    assert timeless_metrics(run) == reference["metrics"]


def test_an_unconfigured_signal_keeps_its_default_action(server, tmp_path):
    run = tmp_path / "u"
    until = ("until", run / "metrics.jsonl", '"step":1,')
    res = server.run(
        "run", TINY, f"out_dir={tmp_path}", "name=u", *FAST, actions=[until, ("signal", "SIGUSR1")]
    )
    assert res["code"] == -signal.SIGUSR1


def test_second_ctrl_c_aborts_mid_save_and_publishes_nothing_partial(server, tmp_path):
    run = tmp_path / "c"
    # Step 2's line is logged just before its (slow) snapshot starts: both Ctrl-Cs land in it.
    actions = [
        ("until", run / "metrics.jsonl", '"step":2,'),
        ("signal", "SIGINT"),
        ("sleep", 0.1),
        ("signal", "SIGINT"),
    ]
    res = server.run(
        "run", TINY, f"out_dir={tmp_path}", "name=c", *FAST, env={_SLOW_SAVE_ENV: "0.3"},
        actions=actions,
    )  # fmt: skip
    assert res["code"] == 130, res["log"]
    assert "interrupted" in res["log"] and "Traceback" not in res["log"]
    assert snapshot_steps(run) == [] and leftovers(run) == []


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    env = _env(tmp_path / "trace", timeout=60)
    cmd = _torchrun_cmd(2, ["-m", "functrain", "run", str(TINY), f"out_dir={tmp_path}"])
    cmd += ["name=d", *FAST, "checkpoint.every=null"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        pid = rank_pid(tmp_path / "trace", 1, 3 * 4, proc, time.monotonic() + 180)
        os.kill(pid, signal.SIGTERM)  # rank 1 only: rank 0 must learn it from the all_reduce
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = stderr.decode(errors="replace")
    run = tmp_path / "d"
    [stop] = snapshot_steps(run)
    assert 3 <= stop < STEPS, text
    assert f"stopped by a signal to another rank after step {stop}" in text
    # The first rank to exit 143 makes torchrun end the job: the other may show 143 or SIGTERM.
    assert "exitcode  : 143 " in text, text
    assert_all_listed_valid(run)
    assert timeless_metrics(run)[-1]["step"] == stop


# ------------------------------------------------------------------ 3. damaged snapshots


@pytest.fixture(scope="module")
def finished(server, tmp_path_factory) -> Path:
    """A finished run keeping every snapshot: state_2 ... state_10."""
    out = tmp_path_factory.mktemp("finished")
    res = server.run("run", TINY, f"out_dir={out}", "name=f", *FAST)
    assert res["code"] == 0, res["log"]
    return out / "f"


@pytest.mark.parametrize("case", DAMAGE)
def test_inspect_and_resume_name_the_damaged_file(server, finished, tmp_path, case):
    damage, name, what = DAMAGE[case]
    run = tmp_path / "f"
    shutil.copytree(finished, run)
    damage(run / FINAL)
    before = tree(run)
    code, report = inspect_json(run / FINAL)
    if name == "manifest.json":  # nothing to report on: a user error naming the file
        assert code == 2
        problem = report["stderr"]
    else:
        assert code == 1 and not report["valid"] and report["digests"] == {}
        [problem] = report["problems"]
    assert f"{run / FINAL / name}" in problem and what in problem, problem
    listed = {r["name"]: r for r in inspect_json(run)[1]["snapshots"]}
    assert not listed[FINAL]["valid"] and what in listed[FINAL]["problem"]  # a lost manifest too
    res = server.run("resume", TINY, f"out_dir={tmp_path}", "name=f", *FAST, "--from", FINAL)
    assert res["code"] == 2 and "Traceback" not in res["log"], res["log"]
    assert f"{run / FINAL}" in res["log"] and what in res["log"], res["log"]
    assert tree(run) == before


def test_resume_from_latest_skips_invalid_snapshots_and_sets_them_aside(
    server, reference, finished, tmp_path
):
    run = tmp_path / "f"
    shutil.copytree(finished, run)
    flip_bit(run / FINAL / "stats.bin")
    truncate(run / "state_8" / "data.bin")
    res = server.run("resume", TINY, f"out_dir={tmp_path}", "name=f", *FAST, "--from", "latest")
    assert res["code"] == 0, res["log"]
    for name, what in ((FINAL, "stats.bin: checksum mismatch"), ("state_8", "data.bin: has")):
        assert f"skipping invalid snapshot {run / name}: {run / name}/{what}" in res["log"]
        assert f"set aside invalid snapshot {run / name} as {name}.invalid" in res["log"]
        assert (run / f"{name}.invalid").is_dir()
    assert snapshot_steps(run) == [2, 4, 6, 8, STEPS]  # resumed from 6, the newest valid
    assert_all_listed_valid(run)
    assert digests(run / FINAL) == reference["digests"]
    assert timeless_metrics(run) == reference["metrics"]


# ------------------------------------------------------------------ 4. failed writes


@pytest.mark.parametrize(
    "error, on_error, at, code, says",
    [
        ("ENOSPC", "stop", 6, 2, "checkpoint.on_error is 'stop'"),
        ("EACCES", "continue", 6, 0, "training goes on (checkpoint.on_error: continue)"),
        ("ENOSPC", "continue", STEPS, 2, "it was the run's last snapshot"),
    ],
)
def test_a_failed_snapshot_write_stops_cleanly_or_warns(
    server, reference, tmp_path, error, on_error, at, code, says
):
    run, args = tmp_path / "w", (f"out_dir={tmp_path}", "name=w", *FAST)
    res = server.run(
        "run",
        TINY,
        *args,
        f"checkpoint.on_error={on_error}",
        env={_SAVE_ERROR_ENV: f"{error}:state_{at}"},
    )
    assert res["code"] == code and "Traceback" not in res["log"], res["log"]
    oserror = os.strerror(getattr(errno, error))
    assert f"could not write snapshot {run / f'state_{at}'}: [Errno " in res["log"]
    assert oserror in res["log"] and says in res["log"], res["log"]
    assert leftovers(run) == []  # the failed save removed its temp dir
    assert_all_listed_valid(run)  # every earlier snapshot intact
    expected = [s for s in range(2, STEPS + 1, 2) if s != at and (code == 0 or s < at)]
    assert snapshot_steps(run) == expected
    if code == 0:
        assert digests(run / FINAL) == reference["digests"]
    if on_error == "stop":  # fix the cause, resume: the run ends as if nothing happened
        res = server.run("resume", TINY, *args, "--from", "latest")
        assert res["code"] == 0, res["log"]
        assert digests(run / FINAL) == reference["digests"]
        assert timeless_metrics(run) == reference["metrics"]


# ------------------------------------------------------------------ 5. retention


def test_retain_keeps_the_newest_the_multiples_and_the_spared(tmp_path):
    snapshots(tmp_path, range(1, 13))
    spared = tmp_path / "state_5"  # e.g. the snapshot this process resumed from
    deleted = Snapshots(tmp_path, Policy(keep_last=2, keep_every=4)).retain(keep={spared, None})
    assert sorted(int(p.name.split("_")[1]) for p in deleted) == [1, 2, 3, 6, 7, 9, 10]
    assert snapshot_steps(tmp_path) == [4, 5, 8, 11, 12]
    assert leftovers(tmp_path) == []
    assert Snapshots(tmp_path, Policy(keep_last=2, keep_every=4)).retain() == [tmp_path / "state_5"]
    assert Snapshots(tmp_path, Policy(keep_every=4)).retain() == []  # null: keep all
    assert snapshot_steps(tmp_path) == [4, 8, 11, 12]


def test_retain_never_deletes_the_newest(tmp_path):
    snapshots(tmp_path, [3, 6])
    assert Snapshots(tmp_path, Policy(keep_last=1)).retain() == [tmp_path / "state_3"]
    assert snapshot_steps(tmp_path) == [6]


def test_clean_partial_removes_dead_processes_leftovers_only(tmp_path):
    dead = dead_pid()
    (tmp_path / f".tmp-state_4-{dead}-0123abcd").mkdir()
    (tmp_path / f".tmp-metrics.jsonl-{dead}").write_bytes(b"{}")
    (tmp_path / f".tmp-metrics.jsonl-{os.getpid()}").write_bytes(b"{}")  # a live writer's
    (tmp_path / "state_4.invalid").mkdir()
    removed = rundir.clean_partial(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".tmp-state_4-{dead}-0123abcd", f".tmp-metrics.jsonl-{dead}"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".tmp-metrics.jsonl-{os.getpid()}", "state_4.invalid"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.keep_every=0", "checkpoint.keep_every: got 0 (int); expected an integer > 0"),
        ("checkpoint.on_error=retry", "checkpoint.on_error: got 'retry' (str); expected 'stop'"),
        ("checkpoint.signal=SIGKILL", "checkpoint.signal: got 'SIGKILL' (str); expected null or"),
    ],
)
def test_recipe_checks_the_reliability_fields(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [override])
    assert message in str(err.value)


def test_reliability_fields_default_to_keep_all_stop_and_no_extra_signal():
    ck = load_recipe(TINY).checkpoint
    assert (ck.keep_last, ck.keep_every, ck.on_error, ck.signal) == (None, None, "stop", None)
    ck = load_recipe(TINY, ["checkpoint.signal=SIGUSR1", "checkpoint.keep_every=100"]).checkpoint
    assert (ck.signal, ck.keep_every) == ("SIGUSR1", 100)


# ------------------------------------------------------------------ 6. fuzzed command lines


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=4))
@example(overrides=["seed=1"])  # valid: trains its step
def test_fuzzed_overrides_never_crash_nor_touch_a_run_directory(tmp_path, overrides):
    out = tmp_path / "runs"
    shutil.rmtree(out, ignore_errors=True)
    (out / "other").mkdir(parents=True)
    (out / "other" / "keep.txt").write_text("untouched")
    before = tree(out)
    # Tiny by default so that a valid line trains a step or two; out_dir is never fuzzed.
    argv = ["run", str(TINY), "steps=1", "schedule.warmup_steps=0", "eval.every=null", *overrides]
    argv.append(f"out_dir={out}")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: bad arguments
            code = e.code
    assert code in (0, 2), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    if code == 0:
        return
    assert err.getvalue().strip(), argv  # a failure always says why
    assert tree(out) == before, argv
    assert sorted(p.name for p in out.iterdir()) == ["other"], argv
