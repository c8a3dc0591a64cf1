"""The per-epoch order: a keyed bijection of [0, n), O(1) per position for any n."""

from __future__ import annotations

import resource
import time

import pytest
import torch

from functrain.data import CursorSampler, fingerprint_changes, make_loader
from functrain.data.order import ORDER_VERSION, Shuffle
from functrain.rng import fold_in


@pytest.mark.parametrize("key", [0, 1, 2**62 + 7])
def test_every_size_up_to_300_is_permuted_exactly(key):
    for n in range(1, 301):
        out = Shuffle(n, key).range(0, n)
        assert torch.equal(out.sort().values, torch.arange(n)), n


def test_ten_billion_samples_a_block_and_a_scatter_of_positions_collide_nowhere():
    n = 10**10
    order = Shuffle(n, 12345)
    block = order.range(n - 300_000, n)  # a contiguous run, as the loader reads them
    g = torch.Generator().manual_seed(0)
    scatter = order(torch.randint(0, n, (300_000,), generator=g, dtype=torch.int64).unique())
    for out in (block, scatter):
        assert int(out.min()) >= 0 and int(out.max()) < n
        assert out.unique().numel() == out.numel()
    # and it shuffles: consecutive positions land far apart, spread over the whole range
    assert float(block[:1000].double().mean()) == pytest.approx(n / 2, rel=0.1)


def test_keys_give_different_orders_and_the_order_is_pinned():
    a, b = Shuffle(1000, 1).range(0, 1000), Shuffle(1000, 2).range(0, 1000)
    assert not torch.equal(a, b)
    # The order is part of what a snapshot means: changing it needs a new ORDER_VERSION.
    assert ORDER_VERSION == 2
    assert Shuffle(10**10, 7).range(0, 4).tolist() == PINNED


PINNED = [5006526472, 4905780331, 4781637898, 3239256193]


def test_the_first_batch_at_any_position_of_ten_billion_samples_is_immediate():
    n, batch = 10**10, 64
    rss = _rss_kib()
    for start in (0, 10**9 * batch, (n // batch - 1) * batch):
        sampler = CursorSampler(n, batch_size=batch, seed=3, start=start)
        t = time.perf_counter()
        first = next(iter(sampler))
        assert time.perf_counter() - t < 1.0 and 0 <= first < n
    assert _rss_kib() - rss < 50 * 1024  # the loader's goal: under 50 MB


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def test_the_loader_order_is_the_bijection_of_the_cursor():
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    loader = make_loader(ds, batch_size=5, seed=9, start=40)  # epoch 0, positions 40..
    got = next(iter(loader))[0]
    assert torch.equal(got, Shuffle(50, fold_in(9, 0)).range(40, 45))


def test_a_snapshot_made_with_the_old_order_is_explained():
    new = {"size": 10, "content": "x", "batch_size": 2, "shuffle": True, "seed": 0, "order": 2}
    old = {k: v for k, v in new.items() if k != "order"}  # written by functrain < 0.3
    (change,) = fingerprint_changes(old, new)
    assert change.startswith("sample order version 1 -> 2")
    assert "torch.randperm" in change and "start a new run" in change
    assert fingerprint_changes(new, dict(new)) == []
