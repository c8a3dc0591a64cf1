"""Gradient reduction that overlaps backward (`parallel: ddp`, `bucket_mb`), for real under
torchrun (gloo, CPU, no mocks): on the step's last backward each bucket's collective starts
as soon as backward has made its gradients, and the bits are those of the reduction after
backward (`bucket_mb: 0`) — in order on 2 processes, canonical on 4 (there also those of one
process). In process: closing a canonical tree a leaf at a time is pushing its last list.
"""

from __future__ import annotations

import orjson
import pytest
import torch
from _dist_common import ROOT, TINY, launch, timeless_metrics

from functrain import canonical, checkpoint
from functrain.distributed.reduce import slots

WORKER = ROOT / "tests" / "_overlap_worker.py"
SHORT = ("steps=6", "checkpoint.every=6", "log_every=1", "eval.every=null")
CANONICAL = ("step.0.micro_batches=1", "step.0.micro_batch_size=2")


def test_closing_a_tree_a_leaf_at_a_time_is_pushing_its_last_list():
    g = torch.Generator().manual_seed(1)
    for width, units in [(1, 1), (1, 4), (3, 2), (3, 8)]:
        lists = [[torch.randn(5, generator=g) for _ in range(3)] for _ in range(width * units)]
        pushed, closed = canonical.TreeSum(width), canonical.TreeSum(width)
        for tensors in lists:
            pushed.push([t.clone() for t in tensors])
        for tensors in lists[:-1]:
            closed.push([t.clone() for t in tensors])
        assert closed.closes()
        last = [closed.close(i, t.clone()) for i, t in reversed(list(enumerate(lists[-1])))]
        closed.closed(last[::-1])
        for a, b in zip(pushed.result(), closed.result(), strict=True):
            assert torch.equal(a, b)
    tree = canonical.TreeSum(2)
    tree.push([torch.ones(1)])
    tree.push([torch.ones(1)])
    assert not tree.closes()  # one unit of two: the next push starts another
    tree = canonical.TreeSum(1)
    tree.push([torch.ones(1)])
    tree.push([torch.ones(1)])
    assert not tree.closes()  # a sum of 2: a third push would not complete one of 4


def test_buckets_follow_backward_and_keep_dtypes_apart():
    f32, bf16 = torch.float32, torch.bfloat16
    params = [torch.zeros(n, dtype=d) for n, d in [(3, f32), (5, bf16), (7, f32), (2, f32)]]
    plan, where = slots(params, limit=40)  # 10 float32s a bucket
    assert plan == [[3, 2], [0], [1]]  # reverse order, by dtype, cut at the limit
    assert where == [(1, 0), (2, 0), (0, 2), (0, 0)]
    for bucket in plan:
        assert len({params[i].dtype for i in bucket}) == 1


def _records(out, world: int) -> list[list]:
    every = [orjson.loads(out.with_name(f"{out.name}.rank{r}").read_bytes()) for r in range(world)]
    assert all(r == every[0] for r in every)  # every rank starts the same collectives
    return every[0]


FP16 = ("precision=fp16", "loss_scale.init=1000")  # a scale whose inverse is inexact


@pytest.mark.parametrize(
    ("world", "extra", "started"),
    [
        (2, (), "all_reduce"),
        (2, FP16, "all_reduce"),
        (4, CANONICAL, "all_to_all_single"),
        (2, ("step.0.micro_batches=1", "step.0.micro_batch_size=1"), "all_to_all_single"),
    ],
    ids=["in_order_2", "in_order_fp16_2", "canonical_4", "canonical_2_deep_tree"],
)
def test_buckets_start_while_backward_runs_with_the_bits_of_after(
    tmp_path, threads_one, world, extra, started
):
    runs = {}
    for bucket_mb in ("0.01", "0"):  # 0.01 MiB: the tiny model's gradients in many buckets
        out = tmp_path / f"records_{bucket_mb}"
        args = (f"out_dir={tmp_path}", f"name=b{bucket_mb}", f"bucket_mb={bucket_mb}")
        launch(world, out, "run", TINY, *args, *SHORT, *extra, script=WORKER)
        runs[bucket_mb] = _records(out, world)
    during = [r for r in runs["0.01"] if r[2]]
    assert len(during) >= 3, runs["0.01"]  # several buckets, each started inside backward
    assert all(name == started and not_waiting for name, not_waiting, _ in during)
    assert not [r for r in runs["0"] if r[2]]  # bucket_mb: 0 reduces after backward
    a, b = tmp_path / "b0.01", tmp_path / "b0"
    assert checkpoint.digests(a / "state_6") == checkpoint.digests(b / "state_6")
    assert timeless_metrics(a) == timeless_metrics(b)
    if any("micro_batch_size" in e for e in extra):  # canonical: one process's bits too
        launch(1, "run", TINY, f"out_dir={tmp_path}", "name=one", *SHORT, *extra)
        assert checkpoint.digests(a / "state_6") == checkpoint.digests(tmp_path / "one" / "state_6")


def test_gradients_a_transform_makes_itself_are_still_reduced(tmp_path, threads_one, monkeypatch):
    """A transform that declares gradients but makes them without the sharding's backward:
    nothing was reduced during backward, so the reduction transform reduces them."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    own = ("step.0._component_=_seam_components.own_grads", "model.dropout=0.0")
    for bucket_mb in ("25", "0"):
        args = (f"out_dir={tmp_path}", f"name=b{bucket_mb}", f"bucket_mb={bucket_mb}")
        launch(2, "run", TINY, *args, *SHORT, *own)
    a, b = tmp_path / "b25", tmp_path / "b0"
    assert checkpoint.digests(a / "state_6") == checkpoint.digests(b / "state_6")
