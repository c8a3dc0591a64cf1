"""Canonical micro-batches: the same bits on 1, 2 or 4 processes, and on resume from any.

In-process: the tree sum, the fit rule, and a rank's share of the micro-batches (seeds,
scaling, BatchNorm statistics) adding up to one process's bits. Under torchrun (gloo, CPU,
no mocks, dropout on): runs on 1, 2 and 4 processes to step 12 are bitwise equal, and
resumes 2 -> 1, 1 -> 2, 4 -> 2, 2 -> 4 at step 6 give the unbroken run's bits; FSDP2 runs
on 2 and 4 processes, and their resumes 4 -> 2 and 2 -> 1, give the same bits again. Every
launch has OMP_NUM_THREADS=1: torch's intra-op threads split CPU reductions, so their
count is part of what a CPU run's bits depend on (torchrun sets 1 for several processes).
"""

from __future__ import annotations

import pytest
import torch
from _dist_common import TINY, launch, timeless_metrics
from torch import nn

from functrain import canonical, checkpoint, create
from functrain.optim import adamw, leaves
from functrain.parallel import Placement
from functrain.steps import forward_backward

CANONICAL = [
    "step.0.micro_batches=1",
    "step.0.micro_batch_size=2",
    "steps=12",
    "checkpoint.every=6",
]


# (1) the tree and the fit rule
def test_tree_sum_is_the_canonical_tree_and_holds_log_partial_sums():
    g = torch.Generator().manual_seed(0)
    for width, units in [(1, 1), (1, 8), (3, 4), (5, 2)]:
        leaves_ = [torch.randn(7, generator=g) for _ in range(width * units)]
        tree = canonical.TreeSum(width)
        for leaf in leaves_:
            tree.push([leaf.clone()])
        level = [
            sum(leaves_[u * width + 1 : (u + 1) * width], leaves_[u * width].clone())
            for u in range(units)
        ]
        while len(level) > 1:  # pairs, siblings first
            level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
        assert torch.equal(tree.result()[0], level[0])
        assert tree.peak <= units.bit_length()  # log2(units) + 1
    tree = canonical.TreeSum(1)
    for _ in range(3):
        tree.push([torch.ones(2)])
    with pytest.raises(ValueError, match="incomplete subtree"):
        tree.result()


def test_fit_rule_and_its_message():
    assert canonical.fits(1, 32, 8) and canonical.fits(2, 32, 8) and canonical.fits(4, 32, 8)
    assert not canonical.fits(8, 32, 8) and not canonical.fits(3, 24, 8)
    assert canonical.fits(2, 24, 4) and not canonical.fits(4, 24, 4)  # V = 6 = 2 * 3
    with pytest.raises(
        ValueError, match=r"3 processes cannot share the 3 micro-batches .* one of 1$|one of 1\. "
    ):
        canonical.check_fit(3, 24, 8)
    with pytest.raises(ValueError, match="micro_batch_size=5"):
        canonical.check_fit(1, 32, 5)
    with pytest.raises(ValueError, match="not both"):
        forward_backward(micro_batches=2, micro_batch_size=4)


# (2) a rank's share, in process: its subtree sum added to the other's is one process's sum
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _state(world: int, rank: int):
    torch.manual_seed(0)
    fb = forward_backward(micro_batch_size=2)
    return create(
        Net(), loss=_loss, optimizer=adamw(lr=1e-2), transforms=[fb], seed=3,
        placement=Placement(world_size=world, rank=rank),
    )  # fmt: skip


def test_ranks_shares_add_up_to_one_process_with_dropout_and_batchnorm():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    one = _state(1, 0)
    one = one.static.transform(one, (x, y))
    halves = []
    for rank in (0, 1):
        s = _state(2, rank)
        halves.append(
            s.static.transform(s, (x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]))
        )
    for a, b0, b1 in zip(
        leaves(one.grads), leaves(halves[0].grads), leaves(halves[1].grads), strict=True
    ):
        assert torch.equal(a, b0 + b1)  # the root of the tree: its two subtrees added
    assert torch.equal(one.metrics["loss"], halves[0].metrics["loss"] + halves[1].metrics["loss"])
    # running statistics: micro-batch 0's, which rank 0 holds (and broadcasts)
    for a, b in zip(leaves(one.buffers), leaves(halves[0].buffers), strict=True):
        assert torch.equal(a, b)
    fresh = _state(1, 0)
    with torch.no_grad(), fresh.bind() as model:
        model.train()
        model.bn(model.fc(x[:2]))  # micro-batch 0 alone through the BatchNorm
    for a, b in zip(leaves(one.buffers), leaves(fresh.buffers), strict=True):
        assert torch.equal(a, b)


# (3) torchrun: 1, 2, 4 processes, and resumes across them
@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, threads_one):
    out = tmp_path_factory.mktemp("canonical")
    for nproc in (1, 2, 4):
        launch(nproc, "run", TINY, f"out_dir={out}", f"name=w{nproc}", *CANONICAL)
    return out


def test_one_two_and_four_processes_give_the_same_bits(unbroken):
    ref = checkpoint.digests(unbroken / "w1" / "state_12")  # every entry, bitwise
    for nproc in (2, 4):
        assert checkpoint.digests(unbroken / f"w{nproc}" / "state_12") == ref
        assert timeless_metrics(unbroken / f"w{nproc}") == timeless_metrics(unbroken / "w1")


@pytest.mark.parametrize(("wrote", "then"), [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_resume_on_another_world_size_is_bitwise(unbroken, wrote, then):
    name = f"r{wrote}to{then}"
    res = launch(
        then, "resume", TINY, f"out_dir={unbroken}", f"name=w{wrote}", "--from", "state_6",
        "--name", name, *CANONICAL,
    )  # fmt: skip
    assert "written by" not in res.stderr  # no world-size warning: the run is canonical
    ref = checkpoint.digests(unbroken / "w1" / "state_12")
    assert checkpoint.digests(unbroken / name / "state_12") == ref
    assert timeless_metrics(unbroken / name) == timeless_metrics(unbroken / "w1")


def test_a_world_size_that_does_not_fit_is_refused_before_any_step(tmp_path, threads_one):
    args = ("name=w3", "data.batch_size=12", *CANONICAL)  # V = 6 micro-batches of 2
    res = launch(3, "run", TINY, f"out_dir={tmp_path}", *args, check=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "step.0.micro_batch_size with data.batch_size 12" in text
    assert "3 processes cannot share the 6 micro-batches" in text and "one of 1, 2." in text
    assert not (tmp_path / "w3").exists()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, threads_one):
    """The same canonical recipe under FSDP2 on 2 and 4 processes."""
    out = tmp_path_factory.mktemp("sharded")
    for nproc in (2, 4):
        launch(nproc, "run", TINY, f"out_dir={out}", f"name=f{nproc}", "parallel=fsdp", *CANONICAL)
    return out


def test_fsdp_gives_the_bits_of_one_process_on_two_and_four(unbroken, sharded):
    """parallel: fsdp keeps each rank's rows only, but its gradients follow the canonical
    tree (whole per micro-batch, then the ranks' sums scattered in the tree's order): every
    entry of its snapshot equals the unsharded run's, clipping's norm included."""
    ref = checkpoint.digests(unbroken / "w1" / "state_12")
    for nproc in (2, 4):
        run = sharded / f"f{nproc}"
        assert checkpoint.read_manifest(run / "state_12")["layout"] == "dcp"  # really sharded
        assert checkpoint.digests(run / "state_12") == ref
        assert timeless_metrics(run) == timeless_metrics(unbroken / "w1")


def test_fsdp_resumes_four_to_two_and_two_to_one_bitwise(unbroken, sharded):
    ref = checkpoint.digests(unbroken / "w1" / "state_12")
    for wrote, then in ((4, 2), (2, 1)):
        name = f"f{wrote}to{then}"
        res = launch(
            then, "resume", TINY, f"out_dir={sharded}", f"name=f{wrote}", "--from", "state_6",
            "--name", name, "parallel=fsdp", *CANONICAL,
        )  # fmt: skip
        assert "written by" not in res.stderr  # no world-size warning: the run is canonical
        assert checkpoint.digests(sharded / name / "state_12") == ref
        assert timeless_metrics(sharded / name) == timeless_metrics(unbroken / "w1")


def test_a_ddp_snapshot_resumes_under_fsdp_bitwise(unbroken, sharded):
    """ddp 2 -> fsdp 4: a recipe change (allowed by name), the same bits."""
    launch(
        4, "resume", TINY, f"out_dir={unbroken}", "name=w2", "--from", "state_6",
        "--name", "w2_fsdp", "parallel=fsdp", *CANONICAL, "--allow-change", "parallel",
    )  # fmt: skip
    ref = checkpoint.digests(unbroken / "w1" / "state_12")
    assert checkpoint.digests(unbroken / "w2_fsdp" / "state_12") == ref


def test_fsdp_in_bf16_gives_the_bits_of_one_process(tmp_path, threads_one):
    """Canonical FSDP gathers float32 params and autocasts as an unsharded run does (not
    FSDP2's bf16 param gathers, whose bits would differ from one process's)."""
    args = (f"out_dir={tmp_path}", "precision=bf16", *CANONICAL)
    launch(1, "run", TINY, "name=one", *args)
    launch(2, "run", TINY, "name=two", "parallel=fsdp", *args)
    one, two = tmp_path / "one", tmp_path / "two"
    assert checkpoint.digests(two / "state_12") == checkpoint.digests(one / "state_12")
    assert timeless_metrics(two) == timeless_metrics(one)
