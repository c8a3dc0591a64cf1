"""Jobs that heal themselves, for real on CPU with gloo: a torchrun worker SIGKILLed under
`--max-restarts` comes back through `--auto-resume` and ends bitwise equal to an unbroken
run, every step logged once; ranks that do not share the run directory (a tmpfs of their
own each, as node-local disks are) are refused before step 1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from _dist_common import _env, _torchrun_cmd, launch
from conftest import timeless_metrics, wait_for_snapshot

from functrain import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ARGS = ["steps=60", "checkpoint.every=5", "log_every=5", "eval.every=null",
        "checkpoint.keep_last=null"]  # fmt: skip


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_worker_killed_under_max_restarts_comes_back_and_ends_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(2, "run", TINY, f"out_dir={tmp_path}", "name=whole", *ARGS)
    torchrun = _torchrun_cmd(2, ["-m", "functrain"])
    cmd = [*torchrun[:3], "--max-restarts=1", *torchrun[3:]]
    args = ["run", str(TINY), f"out_dir={tmp_path}", "name=cut", *ARGS, "--auto-resume"]
    job = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(None, timeout=20))  # fmt: skip
    run = tmp_path / "cut"
    try:
        wait_for_snapshot(run, 10, job, timeout=180)
        workers = _children(job.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)  # a lost GPU, an OOM kill: no goodbye
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    assert "--auto-resume" in err and "continuing from the newest valid one" in err
    assert checkpoint.digests(run / "state_60") == checkpoint.digests(
        tmp_path / "whole" / "state_60"
    )
    assert timeless_metrics(run) == timeless_metrics(tmp_path / "whole")  # each step once


@pytest.fixture
def own_disks(tmp_path):
    """A launcher that gives each rank a private tmpfs at the same path (a mount namespace
    per process: node-local disks); skipped where mounts are not allowed."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0 or shutil.which("unshare") is None:
        pytest.skip("unshare -m is not allowed here")
    disk = tmp_path / "local"
    disk.mkdir()
    script = tmp_path / "rank.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'exec unshare -m sh -c \'mount -t tmpfs tmpfs {disk} && exec "$0" "$@"\' '
        f'{sys.executable} -m functrain "$@"\n'
    )
    script.chmod(0o755)
    return disk, script


def test_ranks_that_do_not_share_the_run_directory_are_refused_before_step_1(own_disks):
    disk, script = own_disks
    cmd = [*_torchrun_cmd(2, ["--no-python", str(script)])]
    res = subprocess.run([*cmd, "run", str(TINY), f"out_dir={disk}", *ARGS],
                         capture_output=True, text=True, env=_env(None), timeout=300)  # fmt: skip
    assert res.returncode != 0
    assert "rank 1 on host" in res.stderr and "does not see the run directory" in res.stderr
    assert "step 1/" not in res.stderr, res.stderr  # refused before any step


def test_a_stop_whose_snapshot_may_not_fit_the_grace_period_says_so(tmp_path):
    args = ["run", str(TINY), f"out_dir={tmp_path}", "steps=100000", "checkpoint.every=5",
            "checkpoint.grace=0.000001", "eval.every=null", "checkpoint.keep_last=2"]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "functrain", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_env(None))  # fmt: skip
    try:
        wait_for_snapshot(tmp_path / "tiny", 1, job)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, err
    assert "the last snapshot took" in err and "checkpoint.grace" in err
    last = checkpoint.list_snapshots(tmp_path / "tiny")[-1][1]
    assert checkpoint.read_manifest(last)["previous_write_seconds"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_elastic_job_that_loses_a_node_finishes_alone_bitwise(tmp_path, monkeypatch):
    """Two torchrun agents (`--nnodes=1:2`, c10d rendezvous on localhost, one process each);
    the second is SIGKILLed with its worker mid-run; the survivor re-forms at world size 1,
    auto-resumes and ends bitwise equal to an unbroken run (canonical micro-batches)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["steps=300", "checkpoint.every=10", "log_every=10", "eval.every=null",
            "step.0.micro_batches=1", "step.0.micro_batch_size=2"]  # fmt: skip
    launch(1, "run", TINY, f"out_dir={tmp_path}", "name=whole", *args)
    port, run_id = _free_port(), f"drill-{os.getpid()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
             "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
             f"--rdzv-id={run_id}", "--max-restarts=3",
             "--rdzv-conf=last_call_timeout=5,join_timeout=120", "-m", "functrain", "run",
             str(TINY), f"out_dir={tmp_path}", "name=elastic", *args, "--auto-resume"]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(None, timeout=20),
                                start_new_session=True)  # fmt: skip

    first = start()  # it binds the rendezvous store: the one that survives
    time.sleep(0.5)
    second = start()
    run = tmp_path / "elastic"
    try:
        wait_for_snapshot(run, 20, first, timeout=240)
        for pid in [second.pid, *_children(second.pid)]:  # the node is gone: agent and worker
            os.kill(pid, signal.SIGKILL)
        _, err = first.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p.poll() is None:
                for pid in [p.pid, *_children(p.pid)]:
                    os.kill(pid, signal.SIGKILL)
    assert first.returncode == 0, err
    sizes = [checkpoint.read_manifest(p)["world_size"] for _, p in checkpoint.list_snapshots(run)]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes  # it shrank and went on
    whole = tmp_path / "whole"
    assert checkpoint.digests(run / "state_300") == checkpoint.digests(whole / "state_300")
    assert timeless_metrics(run) == timeless_metrics(whole)  # every step once


def test_auto_resume_starts_continues_finishes_and_refuses_a_changed_recipe(tmp_path):
    from conftest import cli

    args = ["run", TINY, f"out_dir={tmp_path}", "steps=20", "checkpoint.every=5",
            "eval.every=null", "auto_resume=true"]  # fmt: skip
    cli(*args, "name=whole")
    died = tmp_path / "tiny"  # a job that died writing its first snapshot left these
    (died / ".tmp-state_5-999999999-0badcafe").mkdir(parents=True)
    (died / "metrics.jsonl").write_text('{"step": 5, "loss": 5.0}\n')
    first = cli(*args, "--until", "10")  # no snapshot yet: it starts afresh
    assert "auto-resume" not in first.stderr
    again = cli(*args)  # a restarted job: it continues
    assert "continuing from the newest valid one" in again.stderr
    run, whole = tmp_path / "tiny", tmp_path / "whole"
    assert checkpoint.digests(run / "state_20") == checkpoint.digests(whole / "state_20")
    assert timeless_metrics(run) == timeless_metrics(whole)
    done = cli(*args)  # restarted after the end: nothing to do, exit 0
    assert "is finished already" in done.stderr
    changed = cli(*args, "optim.lr=1e-4", "steps=30", check=False)
    assert changed.returncode == 2 and "the recipe differs" in changed.stderr


PLACED = """
import os, sys
import orjson, torch
import torch.distributed as td
from functrain import distributed
from functrain.run import build

ctx = distributed.init()
seen = {"rank": ctx.rank, "local_rank": ctx.local_rank, "backend": str(td.get_backend()),
        "auto": str(build.resolve_device("auto", ctx.local_rank))}
# A node with 2 GPUs, faked after the group is up (gloo): which one does this process take?
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
torch.cuda.set_device = lambda d: seen.__setitem__("current", str(d))
seen["cuda"] = str(build.resolve_device("cuda", ctx.local_rank))
open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "wb").write(orjson.dumps(seen))
distributed.close()
"""


def test_on_two_nodes_each_process_takes_the_gpu_of_its_local_rank(tmp_path):
    """Two torchrun agents, one process each (`--nnodes=2`, c10d rendezvous on localhost):
    global ranks 0 and 1, both local rank 0. Each takes cuda:LOCAL_RANK (here cuda:0 on both
    nodes, where RANK % device_count gave the second node cuda:1) and makes it current; a
    machine without CUDA gets a gloo group and the CPU."""
    script = tmp_path / "placed.py"
    script.write_text(PLACED)
    port = _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
             f"--rdzv-id=nodes-{os.getpid()}", str(script), str(tmp_path)]  # fmt: skip
    first = subprocess.Popen(agent, stderr=subprocess.PIPE, text=True, env=_env(None))
    time.sleep(0.5)  # it binds the rendezvous store
    second = subprocess.Popen(agent, stderr=subprocess.PIPE, text=True, env=_env(None))
    for p in (first, second):
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    seen = [orjson.loads((tmp_path / f"rank{r}.json").read_bytes()) for r in range(2)]
    assert [(s["rank"], s["local_rank"]) for s in seen] == [(0, 0), (1, 0)]
    for s in seen:
        assert (s["backend"], s["auto"]) == ("gloo", "cpu")
        assert s["cuda"] == s["current"] == "cuda:0"


def test_more_processes_on_a_node_than_gpus_is_refused_by_name(monkeypatch):
    from functrain.errors import UserError
    from functrain.run import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"local rank 2 on its node, which has 2 CUDA device"):
        build.resolve_device("cuda", local_rank=2)
