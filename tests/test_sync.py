"""No host sync on plain steps: the loop can run ahead of a GPU.

A step that does not log, evaluate or snapshot reads no value of a device tensor and waits
for no other rank: stop requests and failed writes are posted in a non-blocking all-reduce
on a CPU group and read `LAG` steps later (`functrain.distributed.agree`). Counted for real
(tests/_sync_worker.py): every `item`/`int`/`bool`/`tolist` and every torch.distributed
call outside the step, per step, in 1, 2 (ddp) and 4 (fsdp) processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from _dist_common import ROOT, TINY, _env, _torchrun_cmd, rank_pid
from _rel_common import snapshot_steps

from functrain.distributed.agree import LAG

WORKER = ROOT / "tests" / "_sync_worker.py"
STEPS, LOG, SNAP = 12, 4, 8
ARGS = (f"steps={STEPS}", f"log_every={LOG}", f"checkpoint.every={SNAP}", "eval.every=8")
ARGS += ("eval.batches=1",)


def _counted(tmp_path, nproc: int, *args: str) -> list[dict]:
    out = tmp_path / "counts.json"
    target = [str(WORKER), str(out), "run", str(TINY), f"out_dir={tmp_path}", "name=s"]
    cmd = _torchrun_cmd(nproc, target) if nproc > 1 else [sys.executable, *target]
    res = subprocess.run(
        [*cmd, *ARGS, *args], capture_output=True, text=True, env=_env(None), timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [
        {
            int(k): v
            for k, v in orjson.loads((tmp_path / f"counts.json.rank{r}").read_bytes()).items()
        }
        for r in range(nproc)
    ]


@pytest.mark.parametrize(("nproc", "parallel"), [(1, "ddp"), (2, "ddp"), (4, "fsdp")])
def test_plain_steps_read_no_device_value_and_wait_for_no_rank(tmp_path, nproc, parallel):
    ranks = _counted(tmp_path, nproc, f"parallel={parallel}")
    synced = {k for k in range(1, STEPS + 1) if k % LOG == 0 or k % SNAP == 0 or k == STEPS}
    for counts in ranks:
        for k in range(1, STEPS + 1):
            seen = counts.get(k, {"reads": [], "control": []})
            if k in synced:  # the control: the counters see what a log step reads
                assert any(".item()" in r for r in seen["reads"]), (k, seen)
                continue
            assert seen["reads"] == [], (k, seen)
            # at most the flags' post: non-blocking, on the CPU group
            expected = [["all_reduce", True]] if nproc > 1 else []
            assert seen["control"] == expected, (k, seen)


def test_sigterm_to_one_rank_stops_every_rank_lag_steps_later(tmp_path):
    """No step logs, evaluates or snapshots: the stop request reaches rank 0 through the
    lagged agreement alone. Rank 1 is frozen at a known step n when the signal is sent;
    every rank stops after the same step, LAG steps after the one that posted the request
    (n, or n + 1 if rank 1 had posted step n's flags already)."""
    steps = 400
    env = _env(tmp_path / "trace", timeout=60)
    cmd = _torchrun_cmd(2, ["-m", "functrain", "run", str(TINY), f"out_dir={tmp_path}"])
    cmd += ["name=d", f"steps={steps}", "log_every=1000", "checkpoint.every=null"]
    cmd += ["eval.every=null", "data.batch_size=4", "step.0.micro_batches=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    trace = tmp_path / "trace" / "rank1.jsonl"
    try:
        pid = rank_pid(tmp_path / "trace", 1, 3 * 4, proc, time.monotonic() + 180)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)  # its last trace line is written
        drawn = [orjson.loads(line) for line in trace.read_bytes().splitlines()]
        n = max(r["samples"] for r in drawn if "samples" in r) // 4 + 1  # its step
        os.kill(pid, signal.SIGTERM)  # rank 1 only, seen when it wakes
        os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = stderr.decode(errors="replace")
    run = tmp_path / "d"
    [stop] = snapshot_steps(run)
    assert LAG >= 1  # else every step waits for the slowest rank's host
    assert stop in (n + LAG, n + 1 + LAG), (n, stop, text)
    assert f"stopped by a signal to another rank after step {stop}" in text, text
    for r in range(2):  # both ranks drew the stop's batch and no other after it
        rows = (tmp_path / "trace" / f"rank{r}.jsonl").read_bytes().splitlines()
        assert max(orjson.loads(x).get("samples", -1) for x in rows) == (stop - 1) * 4
