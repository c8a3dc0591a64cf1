"""Streaming sources resume exactly in O(1); plain iterables are refused on resume, or
replayed when the recipe says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _streams import Records, Windows
from conftest import assert_branch_resumes_bitwise, cli

from functrain import checkpoint
from functrain.data import DataError, Stream, make_loader

SIZES = [37, 50, 13, 64, 1, 29]  # 194 records, uneven shards, one of a single record
TESTS = Path(__file__).resolve().parent
TINY = TESTS.parent / "recipes" / "tiny.yaml"


def batches(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def loader(stream, start=0, **kw):
    return make_loader(stream, batch_size=kw.pop("batch_size", 8), seed=4, start=start, **kw)


def test_each_epoch_reads_every_record_once_in_windows_of_one_shard():
    stream = Stream(Records(SIZES), window=16)
    per_epoch = 194 // 8
    got = torch.cat(batches(loader(stream), per_epoch * 2))
    for epoch in got.split(per_epoch * 8):
        assert epoch.unique().numel() == epoch.numel()  # the tail (2 records) is dropped
    assert not torch.equal(got[: per_epoch * 8], got[per_epoch * 8 :])  # epochs differ
    assert not torch.equal(got[:8], torch.arange(8))  # shuffled
    # Position p of an epoch lies in one window of one shard: 16 consecutive positions of
    # a window come from 16 consecutive records.
    keyed = stream.keyed(4, True)
    located = [keyed.locate(0, p) for p in range(194)]
    shards = [s for s, _ in located]
    assert set(shards) == set(range(len(SIZES)))
    first = located[:16]
    assert len({s for s, _ in first}) == 1
    assert sorted(r for _, r in first) == list(
        range(first[0][1] // 16 * 16, first[0][1] // 16 * 16 + 16)
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [1, 5, 23, 30])
def test_a_resumed_stream_gives_the_batches_of_an_unbroken_one(k, workers):
    stream = Stream(Records(SIZES), window=16)
    straight = batches(loader(stream, num_workers=workers), 34)
    resumed = batches(loader(stream, start=k * 8, num_workers=workers), 34 - k)
    assert all(torch.equal(a, b) for a, b in zip(straight[k:], resumed, strict=True))


def test_resuming_reads_at_most_two_windows_whatever_the_position():
    for start in (8, 8 * 1000, 8 * 10**6):
        source = Records(SIZES)
        next(iter(loader(Stream(source, window=16), start=start)))
        assert source.read <= 2 * 16


def test_two_ranks_read_the_slices_of_the_one_rank_order():
    stream = Stream(Records(SIZES), window=16)
    one = batches(loader(stream, batch_size=8), 10)
    two = [batches(loader(stream, batch_size=4, world_size=2, rank=r), 10) for r in (0, 1)]
    for g, a, b in zip(one, *two, strict=True):
        assert torch.equal(g, torch.cat([a, b]))


def test_a_source_that_breaks_its_promise_or_the_protocol_is_named():
    class Short(Records):
        def open(self, shard, offset):
            yield from list(super().open(shard, offset))[:1]

    with pytest.raises(DataError, match=r"Short.open\(\d+, \d+\) gave 1 records"):
        next(iter(loader(Stream(Short(SIZES), window=16))))
    with pytest.raises(DataError, match="is not a functrain.data.Source"):
        Stream([1, 2, 3])


def test_a_plain_iterable_is_read_in_order_and_refused_past_zero_unless_replayed(capsys):
    data = Windows(100, 4)
    straight = batches(make_loader(data, batch_size=8, seed=0), 20)
    assert torch.equal(straight[0][0][0], next(iter(data))[0])  # its own order
    with pytest.raises(DataError, match="cannot be resumed at sample 40.*data.replay: true"):
        make_loader(data, batch_size=8, seed=0, start=40)
    with pytest.raises(DataError, match="set data.num_workers: 0"):
        make_loader(data, batch_size=8, seed=0, num_workers=2)
    replayed = batches(make_loader(data, batch_size=8, seed=0, start=40, replay=True), 15)
    assert "skipping the first 40 records" in capsys.readouterr().err
    for a, b in zip(straight[5:], replayed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    halves = [
        batches(make_loader(data, batch_size=4, seed=0, world_size=2, rank=r), 20) for r in (0, 1)
    ]
    for g, a, b in zip(straight, *halves, strict=True):
        assert torch.equal(g[0], torch.cat([a[0], b[0]]))


# ---------------------------------------------------------------- end to end, in the CLI

STREAM = "data.dataset={_component_: _streams.sharded_tokens, block_size: 32, sizes: [90, 70, 41]}"
ITERABLE = "data.dataset={_component_: _streams.iterable_tokens, block_size: 32}"
STATEFUL = "data.dataset={_component_: _streams.stateful_tokens, block_size: 32, n: 60}"
SHORT = ("steps=12", "checkpoint.every=6", "log_every=3", "eval.every=null")
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_on_a_sharded_stream_resumes_bitwise(tmp_path, workers):
    assert_branch_resumes_bitwise(
        tmp_path, TINY, STREAM, f"data.num_workers={workers}", *SHORT, env=ENV
    )


def test_a_run_on_a_plain_iterable_is_refused_on_resume_unless_replayed(tmp_path):
    args = (f"out_dir={tmp_path}", ITERABLE, *SHORT)
    cli("run", TINY, "name=A", *args, env=ENV)
    before = sorted(p.name for p in (tmp_path / "A").iterdir())
    res = cli(
        "resume", TINY, "name=A", *args, "--from", "state_6", "--name", "B", env=ENV, check=False
    )
    assert res.returncode == 2, res.stderr
    assert "Windows) is a plain IterableDataset, which cannot be resumed at sample 48" in res.stderr
    assert (
        not (tmp_path / "B").exists()
        and sorted(p.name for p in (tmp_path / "A").iterdir()) == before
    )
    res = cli(
        "resume",
        TINY,
        "name=A",
        *args,
        "data.replay=true",
        "--from",
        "state_6",
        "--name",
        "C",
        env=ENV,
    )
    assert "skipping the first 48 records" in res.stderr
    a, c = tmp_path / "A", tmp_path / "C"
    assert checkpoint.digests(c / "state_12") == checkpoint.digests(a / "state_12")


def test_a_stateful_iterable_is_resumed_from_the_state_its_snapshot_recorded(tmp_path):
    """60 windows, 8 a step: the resume at step 6 (48 read) crosses into the second pass."""
    a, _, res = assert_branch_resumes_bitwise(tmp_path, TINY, STATEFUL, *SHORT, env=ENV)
    assert checkpoint.read_manifest(a / "state_6")["data_state"] == {"position": 48}
    assert "skipping" not in res.stderr


def test_a_stateful_iterable_without_a_recorded_state_is_refused():
    from _streams import StatefulWindows

    from functrain.data import restore

    data = StatefulWindows(10, 4)
    with pytest.raises(DataError, match="recorded none"):
        restore(data, None, 8, replay=False)
    assert restore(data, {"position": 3}, 8, replay=False) is True
    assert data.position == 3


def test_replay_reads_a_stateful_iterable_from_its_start_when_no_state_was_recorded(capsys):
    from _streams import StatefulWindows

    from functrain.data import restore

    straight = batches(make_loader(StatefulWindows(40, 4), batch_size=8, seed=0), 6)
    fresh = StatefulWindows(40, 4)
    assert restore(fresh, None, 16, replay=True) is False  # nothing to load: replay it
    replayed = batches(make_loader(fresh, batch_size=8, seed=0, start=16, replay=True), 4)
    assert "skipping the first 16 records" in capsys.readouterr().err
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[2:], replayed, strict=True))


def test_a_stateful_iterable_restored_at_the_end_of_a_pass_goes_on_into_the_next():
    from _streams import StatefulWindows

    from functrain.data import restore

    straight = batches(make_loader(StatefulWindows(16, 4), batch_size=8, seed=0), 4)
    data = StatefulWindows(16, 4)
    placed = restore(data, {"position": 16}, 16, replay=False)  # at the pass's very end
    resumed = batches(make_loader(data, batch_size=8, seed=0, start=16, restored=placed), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[2:], resumed, strict=True))
