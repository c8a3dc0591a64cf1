"""Jobs that heal themselves, for real on CPU with gloo: a torchrun worker SIGKILLed under
`--max-restarts` comes back through `--auto-resume` and ends bitwise equal to an unbroken
run, every step logged once; ranks that do not share the run directory (a tmpfs of their
own each, as node-local disks are) are refused before step 1."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
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


OWN_DISK = ROOT / "tests" / "_own_disk_worker.py"
SHORT = ["steps=10", "checkpoint.every=5", "eval.every=null"]


def _on_own_disks(base: Path, *args: str) -> subprocess.CompletedProcess:
    """`functrain ARGS` on 2 ranks, each in a folder of its own under `base` (out_dir=runs:
    the same path on every rank, a different directory on each, as node-local disks are)."""
    cmd = _torchrun_cmd(2, [str(OWN_DISK), str(base)])
    return subprocess.run([*cmd, *args], capture_output=True, text=True,
                          env=_env(None), timeout=300)  # fmt: skip


def _refused_before_step_1(res: subprocess.CompletedProcess, base: Path) -> None:
    assert res.returncode != 0, res.stderr
    assert "exitcode  : 2" in res.stderr, res.stderr  # each rank's: a user error
    host, path = socket.gethostname(), (base / "rank1" / "runs" / "tiny").resolve()
    assert f"rank 1 on host {host} does not see the run directory {path}" in res.stderr
    assert f"that rank 0 on host {host} writes" in res.stderr
    assert "step 1/" not in res.stderr and "step 6/" not in res.stderr  # before any step


def test_ranks_that_do_not_share_the_run_directory_are_refused_before_step_1(tmp_path, monkeypatch):
    """Root-free: each rank's `out_dir` is a directory of its own (`_own_disk_worker.py`).
    Refused by `run`, and by `resume --from latest` of a run a shared directory held
    before, copied onto each rank's disk."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tmp_path / "nodes"
    _refused_before_step_1(_on_own_disks(base, "run", str(TINY), *SHORT), base)
    run = base / "rank0" / "runs" / "tiny"  # what rank 0 made: no step logged, no snapshot
    assert not checkpoint.list_snapshots(run) and not (run / "metrics.jsonl").read_bytes()

    shared = tmp_path / "shared"
    launch(2, "run", TINY, f"out_dir={shared}", *SHORT, "--until", "5")
    for rank in (0, 1):
        own = base / f"rank{rank}" / "runs"
        shutil.rmtree(own, ignore_errors=True)
        shutil.copytree(shared, own)
    res = _on_own_disks(base, "resume", str(TINY), *SHORT, "--from", "latest")
    _refused_before_step_1(res, base)
    for rank in (0, 1):
        run = base / f"rank{rank}" / "runs" / "tiny"
        assert [s for s, _ in checkpoint.list_snapshots(run)] == [5]
        assert timeless_metrics(run) == timeless_metrics(shared / "tiny")  # nothing cut


def test_a_shard_the_metadata_lists_but_rank_0_cannot_see_is_never_published(tmp_path):
    """`dcp._publish` on rank 0, after every rank wrote: a shard file `.metadata` lists but
    the directory lacks (a rank wrote it onto its own disk) stops it, naming the file."""
    import torch.distributed.checkpoint as dist_cp
    from tensordict import TensorDict

    from functrain.checkpoint import dcp
    from functrain.errors import SnapshotError

    tmp, final = tmp_path / ".tmp-state_1", tmp_path / "state_1"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dist_cp.save({"params/w": torch.ones(3)}, storage_writer=dist_cp.FileSystemWriter(tmp),
                     no_dist=True)  # fmt: skip
    shard = next(tmp.glob("*.distcp"))
    shard.unlink()  # written where rank 0 cannot see it
    whole = TensorDict({"params": {"w": torch.ones(3)}}, batch_size=[])
    with pytest.raises(SnapshotError, match=rf"the shard file\(s\) {shard.name} that other "):
        dcp._publish(tmp, final, whole, {"step": 1})
    assert not final.exists() and not (tmp / checkpoint.MANIFEST).exists()


def test_inspect_checks_every_shard_metadata_lists_not_only_the_manifests(tmp_path):
    """A snapshot published before the shard guard, with only rank 0's shards (its manifest
    listing those alone): `inspect` and `verify` find the shard `.metadata` lists but the
    directory lacks, by name."""
    import torch.distributed.checkpoint as dist_cp
    from conftest import cli, rewrite_manifest
    from tensordict import TensorDict

    from functrain.checkpoint import dcp

    tmp, final = tmp_path / ".tmp-state_1", tmp_path / "state_1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save({"params/w": torch.ones(3)}, storage_writer=dist_cp.FileSystemWriter(tmp),
                     no_dist=True)  # fmt: skip
    dcp._publish(tmp, final, TensorDict({"params": {"w": torch.ones(3)}}, batch_size=[]),
                 {"step": 1})  # fmt: skip
    assert checkpoint.verify(final) == []
    shard = next(final.glob("*.distcp"))
    manifest = checkpoint.read_manifest(final)
    del manifest["files"][shard.name]  # as the old bug published it: rank 0's files only
    rewrite_manifest(final, manifest)
    shard.unlink()
    (problem,) = checkpoint.verify(final)
    assert f"lists shard file(s) {shard.name} that the snapshot lacks" in problem
    res = cli("inspect", final, check=False)
    assert res.returncode == 1 and shard.name in res.stdout + res.stderr
    outside = tmp_path / "elsewhere.distcp"  # a shard that is a link out of the snapshot
    outside.write_bytes(b"")
    shard.symlink_to(outside)
    (problem,) = checkpoint.verify(final)
    assert "points outside the snapshot's shard files" in problem


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


#: Canonical micro-batches: the bits do not depend on the world size.
ELASTIC = ["eval.every=null", "step.0.micro_batches=1", "step.0.micro_batch_size=2"]

#: For a node to rejoin, torch 2.13's agents must not share the rendezvous store with their
#: workers: with it shared, the re-rendezvous after a scale-up times out inside torchrun
#: (role_info / MASTER_ADDR never set; 2 of 2 tries here). README: Running on a cluster.
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _agents(out: Path, args: list[str], env: dict | None = None) -> Callable[[], subprocess.Popen]:
    """A starter of the torchrun agents of one elastic job (`--nnodes=1:2`, c10d rendezvous
    on localhost, one process each) running `functrain run TINY name=elastic ARGS
    --auto-resume`; the first started binds the rendezvous store."""
    port = _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2",
             "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
             f"--rdzv-id=drill-{port}", "--max-restarts=3",
             "--rdzv-conf=last_call_timeout=5,join_timeout=120", "-m", "functrain", "run",
             str(TINY), f"out_dir={out}", "name=elastic", *args, "--auto-resume"]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**_env(None, timeout=20), **(env or {})},
                                start_new_session=True)  # fmt: skip

    return start


def _kill(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers: a node lost."""
    for pid in [agent.pid, *_children(agent.pid)]:
        os.kill(pid, signal.SIGKILL)


def _world_sizes(run: Path) -> list[int]:
    """The world size of each snapshot of `run`, oldest first."""
    out = []
    for _, p in checkpoint.list_snapshots(run):
        with contextlib.suppress(checkpoint.SnapshotError):  # one being retired meanwhile
            out.append(checkpoint.read_manifest(p)["world_size"])
    return out


def test_an_elastic_job_that_loses_a_node_finishes_alone_bitwise(tmp_path, monkeypatch):
    """Two torchrun agents (`--nnodes=1:2`, c10d rendezvous on localhost, one process each);
    the second is SIGKILLed with its worker mid-run; the survivor re-forms at world size 1,
    auto-resumes and ends bitwise equal to an unbroken run (canonical micro-batches)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["steps=300", "checkpoint.every=10", "log_every=10", *ELASTIC]
    launch(1, "run", TINY, f"out_dir={tmp_path}", "name=whole", *args)
    start = _agents(tmp_path, args)
    first = start()  # it binds the rendezvous store: the one that survives
    time.sleep(0.5)
    second = start()
    run = tmp_path / "elastic"
    try:
        wait_for_snapshot(run, 20, first, timeout=240)
        _kill(second)  # the node is gone: agent and worker
        _, err = first.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p.poll() is None:
                _kill(p)
    assert first.returncode == 0, err
    sizes = _world_sizes(run)
    assert sizes[0] == 2 and sizes[-1] == 1, sizes  # it shrank and went on
    whole = tmp_path / "whole"
    assert checkpoint.digests(run / "state_300") == checkpoint.digests(whole / "state_300")
    assert timeless_metrics(run) == timeless_metrics(whole)  # every step once


def test_a_node_that_comes_back_is_taken_in_at_the_next_restart_bitwise(tmp_path, monkeypatch):
    """The elastic drill, then the lost node returns: a third agent joins the rendezvous,
    torchrun restarts the survivor's worker (SIGTERM: a preemption snapshot) and the job goes
    on at world size 2 again, to the bits of an unbroken run, every step logged once."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["steps=1000", "checkpoint.every=20", "log_every=20", *ELASTIC]  # the join: ~250 steps
    launch(1, "run", TINY, f"out_dir={tmp_path}", "name=whole", *args)
    start = _agents(tmp_path, args, NO_SHARED_STORE)
    run = tmp_path / "elastic"
    first = start()
    time.sleep(0.5)
    agents = [first, start()]
    try:
        wait_for_snapshot(run, 20, first, timeout=240)
        _kill(agents[1])  # the node is lost
        end = time.monotonic() + 240
        while _world_sizes(run)[-1:] != [1] or _world_sizes(run).count(1) < 2:
            assert first.poll() is None and time.monotonic() < end, _world_sizes(run)
            time.sleep(0.2)
        agents.append(start())  # the node comes back
        _, err = first.communicate(timeout=400)
        _, err3 = agents[2].communicate(timeout=60)
    finally:
        for p in agents:
            if p.poll() is None:
                _kill(p)
    assert first.returncode == 0 and agents[2].returncode == 0, err + "\n=====\n" + err3
    seen = [k for k, _ in itertools.groupby(_world_sizes(run))]
    assert seen == [2, 1, 2], _world_sizes(run)  # shrank, went on alone, grew again
    whole = tmp_path / "whole"
    assert checkpoint.digests(run / "state_1000") == checkpoint.digests(whole / "state_1000")
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


def _damage(snapshot: Path) -> None:
    """Flip a byte in each of the snapshot's data files (sizes kept: a bit flip)."""
    files = [f for f in snapshot.iterdir() if f.suffix in (".bin", ".distcp") and f.stat().st_size]
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))


def test_auto_resume_refuses_a_run_directory_whose_snapshots_are_all_invalid(tmp_path):
    """Neither continue (nothing valid) nor start afresh over a damaged history: exit 2,
    naming the directory and each snapshot, and nothing in it changed."""
    from conftest import cli

    args = ["run", TINY, f"out_dir={tmp_path}", *SHORT, "--auto-resume"]
    cli(*args, "--until", "10")
    run = tmp_path / "tiny"
    snapshots = [p for _, p in checkpoint.list_snapshots(run)]
    assert [p.name for p in snapshots] == ["state_5", "state_10"]
    for snap in snapshots:
        _damage(snap)

    def listing() -> dict:  # the owner's .lock names each new owner: the rest stays
        return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"}

    before = listing()
    metrics = (run / "metrics.jsonl").read_bytes()
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr
    assert f"run directory {run} holds snapshots, but none is valid (state_5, state_10" in (
        res.stderr
    )
    assert "the run is not started afresh over a damaged history" in res.stderr
    assert "remove them (or the whole run directory)" in res.stderr and "name=NEW" in res.stderr
    assert listing() == before  # none set aside, removed or rewritten
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert "step 11/" not in res.stderr


def test_a_stop_right_after_a_resume_warns_by_the_resumed_snapshots_write_time(tmp_path):
    """A new process knows no write time of its own until its first snapshot: it takes the
    one the resumed snapshot's manifest records (`write_started` to `created`)."""
    from datetime import datetime, timedelta

    from conftest import cli, rewrite_manifest

    from functrain.checkpoint.manager import write_seconds_of

    common = [f"out_dir={tmp_path}", "steps=100000", "eval.every=null", "log_every=1"]
    cli("run", TINY, *common, "checkpoint.every=5", "--until", "5")
    run, snap = tmp_path / "tiny", tmp_path / "tiny" / "state_5"
    manifest = checkpoint.read_manifest(snap)
    assert write_seconds_of(manifest) >= 0 and "previous_write_seconds" not in manifest
    created = datetime.fromisoformat(manifest["created"])
    manifest["write_started"] = (created - timedelta(seconds=100)).isoformat()  # a big model
    rewrite_manifest(snap, manifest)
    args = ["resume", str(TINY), *common, "checkpoint.every=100000", "--from", "latest"]
    job = subprocess.Popen([sys.executable, "-m", "functrain", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_env(None))  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not any(r["step"] > 5 for r in timeless_metrics(run)):  # training, unsaved
            assert job.poll() is None and time.monotonic() < end, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, err
    assert "the last snapshot took 100.0 s and the launcher allows 30 s" in err
    last = checkpoint.read_manifest(checkpoint.list_snapshots(run)[-1][1])
    assert last["previous_write_seconds"] == 100.0


def test_the_write_time_of_an_older_snapshot_is_unknown_or_its_predecessors():
    from functrain.checkpoint.manager import write_seconds_of

    created = "2025-01-01T00:00:10+00:00"
    assert write_seconds_of({"created": created}) is None  # before write times were kept
    assert write_seconds_of({"created": created, "previous_write_seconds": 4.5}) == 4.5
    started = "2025-01-01T00:00:07+00:00"
    assert write_seconds_of({"created": created, "write_started": started}) == 3.0
    assert write_seconds_of({"created": created, "write_started": "later"}) is None


def test_a_resume_at_a_world_size_that_does_not_fit_is_refused_before_reading_a_snapshot(
    tmp_path, monkeypatch
):
    """A restart on 3 processes of a canonical run (6 micro-batches: 1, 2 fit) is refused
    by name before any snapshot is read: its snapshot, damaged here, is not even noticed."""
    from conftest import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"out_dir={tmp_path}", "data.batch_size=12", "step.0.micro_batches=1",
            "step.0.micro_batch_size=2", *SHORT]  # fmt: skip
    cli("run", TINY, *args, "--until", "5")
    run = tmp_path / "tiny"
    _damage(run / "state_5")
    res = launch(3, "resume", TINY, *args, "--from", "latest", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "step.0.micro_batch_size with data.batch_size 12" in text
    assert "3 processes cannot share the 6 micro-batches" in text and "one of 1, 2." in text
    assert "invalid snapshot" not in text and (run / "state_5").is_dir()
