"""FSDP2 for real: `parallel: fsdp` under `torchrun` on CPU with gloo, no mocks.

A sharded run keeps on each rank only its rows of every param and optimizer leaf, and
writes snapshots through torch.distributed.checkpoint, each rank its own rows. What holds:
- 2 -> 2 resume is bitwise (dropout on): same shards, same per-rank masks, same reductions;
  async snapshots (every rank writes a staged copy on a gloo group of its own) are bitwise
  the synchronous ones.
- Resharding is exact: a 2-rank snapshot read by 3 ranks and written back is bitwise the same.
- 2 -> 3, 2 -> 1 and 1 -> 2 resumes train on the same global batches with the same LR; params
  stay within 1e-4 of the unbroken run, not bitwise, for the reason test_dist.py gives
  (gradients are reduced in another order), so these runs switch dropout off.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import orjson
import pytest
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
    timeless_metrics,
    trace,
)
from conftest import rewrite_manifest

from functrain import checkpoint, cli
from functrain.checkpoint import raw
from functrain.checkpoint.faults import SLOW_SAVE_ENV as _SLOW_SAVE_ENV

# Global batch 12: divisible by 1, 2 and 3 ranks.
BASE = ("parallel=fsdp", "data.batch_size=12", "steps=12", "checkpoint.every=6", "log_every=1")
BASE += ("eval.every=6", "eval.batches=1")
NO_DROPOUT = (*BASE, "model.dropout=0.0")
PARAMS_ATOL = 1e-4


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An unbroken 2-rank FSDP run with dropout, synchronous snapshots at steps 6 and 12."""
    out = tmp_path_factory.mktemp("full")
    launch(2, "run", TINY, f"out_dir={out}", "name=full", *BASE)
    return out / "full"


def test_async_sharded_snapshots_equal_synchronous_ones(full, tmp_path):
    args = ("name=async", "checkpoint.async=true", "checkpoint.keep_last=1")
    launch(2, "run", TINY, f"out_dir={tmp_path}", *BASE, *args)
    run = tmp_path / "async"
    assert [s for s, _ in checkpoint.list_snapshots(run)] == [12]  # retention ran, on rank 0
    assert digests(run / "state_12") == digests(full / "state_12")
    assert timeless_metrics(run) == timeless_metrics(full)


def test_killed_while_publishing_then_resumed_two_to_two_is_bitwise(full, tmp_path):
    """Rank 0 is SIGKILLed after every rank wrote its rows of state_12 but before it is
    published: nothing is listed, and `resume --from latest` (state_6, dropout on) ends
    bitwise where the unbroken run ends."""
    cut = tmp_path / "cut"
    files = sorted(p.name for p in (full / "state_6").iterdir())
    assert files == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "manifest.json",
        "manifest.sha256",
    ]
    assert checkpoint.read_manifest(full / "state_6")["layout"] == "dcp"
    env = {**_env(None, timeout=30), _SLOW_SAVE_ENV: "2"}  # rank 0 waits before publishing
    cmd = _torchrun_cmd(2, ["-m", "functrain", "run", str(TINY), f"out_dir={tmp_path}"])
    proc = subprocess.Popen([*cmd, "name=cut", *BASE], stderr=subprocess.PIPE, env=env)
    try:
        pid = _publishing_pid(cut, "state_12", proc, time.monotonic() + 180)
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and not (cut / "state_12").exists()
    assert [s for s, _ in checkpoint.list_snapshots(cut)] == [6]
    res = launch(2, "resume", TINY, f"out_dir={tmp_path}", "name=cut", *BASE, "--from", "latest")
    assert "left over by an interrupted write" in res.stderr
    assert not list(cut.glob(".tmp-*"))
    assert digests(cut / "state_12") == digests(full / "state_12")  # every entry, bitwise
    assert timeless_metrics(cut) == timeless_metrics(full)


def _publishing_pid(run: Path, name: str, proc, deadline: float) -> int:
    """Rank 0's pid, once DCP finished writing `name` (its temp dir is named after rank 0)."""
    while time.monotonic() < deadline and proc.poll() is None:
        for tmp in run.glob(f".tmp-{name}-*"):
            if (tmp / ".metadata").exists():
                return int(tmp.name.split("-")[2])
        time.sleep(0.005)
    raise AssertionError(f"{name} was never written: exit {proc.poll()}")


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """Unbroken traced runs, dropout off: FSDP on 2 ranks, and the same recipe in 1 process."""
    out = tmp_path_factory.mktemp("fsdp")
    for nproc, name in ((2, "two"), (1, "one")):
        launch(nproc, "run", TINY, f"out_dir={out}", f"name={name}", *NO_DROPOUT,
               trace=out / f"trace_{name}")  # fmt: skip
    return out


def test_a_sharded_snapshot_reshards_bitwise_onto_three_ranks(cross, tmp_path):
    snap, again = cross / "two" / "state_6", tmp_path / "state_6"
    launch(3, TINY, snap, again, *NO_DROPOUT, script=ROOT / "tests" / "_fsdp_worker.py")
    assert sorted(p.name for p in again.iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]  # fmt: skip
    shards = [(tmp_path / f"state_6.rank{r}").read_text() for r in range(3)]
    assert shards == ["[86, 32]", "[86, 32]", "[84, 32]"]  # 256 rows of tok/weight
    assert digests(again) == digests(snap)


def test_one_process_reads_a_sharded_snapshot_whole(cross):
    snap = cross / "two" / "state_6"
    tensors, _ = checkpoint.load(snap)
    assert tuple(tensors["params", "tok", "weight"].shape) == (256, 32)
    assert int(tensors["step"]) == 6 and int(tensors["data", "samples"]) == 72
    assert (tensors["opt", "nu", "tok", "weight"] > 0).any()


@pytest.mark.parametrize(
    ("nproc", "source", "name"),
    [(3, "two", "two_to_three"), (1, "two", "two_to_one"), (2, "one", "one_to_two")],
)
def test_resume_on_other_world_sizes_keeps_samples_and_lr(cross, nproc, source, name):
    res = launch(
        nproc, "resume", TINY, f"out_dir={cross}", f"name={source}", *NO_DROPOUT,
        "--from", "state_6", "--name", name, trace=cross / f"trace_{name}",
    )  # fmt: skip
    assert "close to, not bitwise" in res.stderr
    assert trace(cross / f"trace_{name}") == trace(cross / f"trace_{source}")[6:]
    lrs = [r["lr"] for r in metrics(cross / "one")]
    assert [r["lr"] for r in metrics(cross / name)] == lrs
    final = params(cross / name / "state_12")
    moved = max_diff(params(cross / "one" / "state_12"), params(cross / "one" / "state_6"))
    for unbroken in ("one", "two"):
        assert max_diff(final, params(cross / unbroken / "state_12")) < PARAMS_ATOL < moved


def test_a_corrupt_shard_is_named(cross, tmp_path, capsys):
    bad = tmp_path / "state_6"
    shutil.copytree(cross / "two" / "state_6", bad)
    with open(bad / "__1_0.distcp", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    problems = checkpoint.verify(bad)
    assert len(problems) == 1 and "__1_0.distcp: checksum mismatch" in problems[0]
    with pytest.raises(checkpoint.SnapshotError, match=r"__1_0\.distcp: checksum mismatch"):
        checkpoint.load(bad)
    assert cli.main(["inspect", str(bad)]) == 1
    assert "__1_0.distcp: checksum mismatch" in capsys.readouterr().out


def test_ranks_share_the_checksums_of_a_sharded_snapshot_and_all_skip_a_bad_one(cross, tmp_path):
    """On resume each rank reads its rows, and verifies its part of the files (rank r: files
    r, r + N, ...); every rank gets every verdict. A shard that only rank 1 checks is bad:
    both ranks skip the snapshot and resume from the one before."""
    run = tmp_path / "two"
    shutil.copytree(cross / "two", run)
    bad = run / "state_12"
    manifest = checkpoint.read_manifest(bad)
    name = list(manifest["files"])[1]  # rank 1's part of the check
    with open(bad / name, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    assert raw.file_problems(bad, manifest, part=(0, 2)) == []  # rank 0 never reads it
    assert len(raw.file_problems(bad, manifest, part=(1, 2))) == 1
    res = launch(2, "resume", TINY, f"out_dir={tmp_path}", "name=two", *NO_DROPOUT,
                 "--from", "latest")  # fmt: skip
    assert f"skipping invalid snapshot {bad}" in res.stderr, res.stderr
    assert "resumed" in res.stdout or "step 12/12" in res.stdout, res.stdout
    assert checkpoint.verify(run / "state_12") == []  # written again, from step 6


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_dcp_metadata_that_would_run_code_is_refused(cross, tmp_path):
    """DCP pickles `.metadata`; functrain's reader builds only DCP's own metadata classes."""
    bad = tmp_path / "state_6"
    shutil.copytree(cross / "two" / "state_6", bad)
    body = pickle.dumps(_Boom())
    (bad / ".metadata").write_bytes(body)
    manifest = orjson.loads((bad / "manifest.json").read_bytes())
    manifest["files"][".metadata"] = {"bytes": len(body), "crc32": zlib.crc32(body)}
    rewrite_manifest(bad, manifest)  # checksums and digest pass: a forgery
    (problem,) = checkpoint.verify(bad)  # verify reads `.metadata` too, as DCP would
    assert re.search(r"refers to (posix|os)\.system", problem)
    with pytest.raises(checkpoint.SnapshotError, match=r"refers to (posix|os)\.system"):
        checkpoint.load(bad)


def test_fp16_under_fsdp_resumes_two_to_two_bitwise_through_skipped_steps(tmp_path):
    """FSDP2 gathers the params in float16 for compute and reduce-scatters float32
    gradients; a step is skipped when any rank's shard of the gradients is not finite."""
    fp16 = (*BASE, "precision=fp16", "loss_scale.init=16777216", "loss_scale.growth_interval=2")
    launch(2, "run", TINY, f"out_dir={tmp_path}", "name=A", *fp16)
    launch(2, "resume", TINY, f"out_dir={tmp_path}", "name=A", *fp16,
           "--from", "state_6", "--name", "B")  # fmt: skip
    a, b = tmp_path / "A", tmp_path / "B"
    assert digests(b / "state_12") == digests(a / "state_12")
    assert timeless_metrics(b) == timeless_metrics(a)
    skipped = [r["skipped_steps"] for r in timeless_metrics(a)]
    assert 0 < skipped[5] < skipped[-1] < 12  # skips before and after the resume point
