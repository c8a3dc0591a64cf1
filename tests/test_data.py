"""The data cursor: exact O(1) resume, world-size invariance, fingerprints, the corpus."""

from __future__ import annotations

import itertools
import pickle
import sysconfig
import time
import warnings

import orjson
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from functrain.data import (
    ByteBlocks,
    CursorSampler,
    DataError,
    fingerprint,
    fingerprint_changes,
    make_loader,
    read_text,
    ship,
    text_corpus,
)
from functrain.data.order import Shuffle
from functrain.rng import fold_in


def take(loader, n: int) -> list[torch.Tensor]:
    """The first tensor of each of the next n batches."""
    it = iter(loader)
    return [next(it)[0] for _ in range(n)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def expected_global(size: int, G: int, seed: int, steps: range) -> list[torch.Tensor]:
    """Global batches straight from the spec: epoch e's order is the bijection
    Shuffle(size, fold_in(seed, e)) of positions."""
    per_epoch = size // G
    out = []
    for s in steps:
        e, b = divmod(s, per_epoch)
        out.append(Shuffle(size, fold_in(seed, e)).range(b * G, (b + 1) * G))
    return out


class Counting(Dataset):
    """Sample i is i; records every index read."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.seen.append(i)
        return (torch.tensor(i),)


# (1) resume mid-epoch and across epoch boundaries, with and without workers
DS = TensorDataset(torch.arange(22))  # G = 4: epoch_len 20, 5 batches an epoch, 2 dropped


@pytest.mark.parametrize("k", [1, 3, 5, 7, 10, 12])
def test_resume_at_any_step_gives_the_same_batches(k):
    cont = take(make_loader(DS, batch_size=4, seed=5), 14)
    assert same(cont, expected_global(22, 4, 5, range(14)))
    resumed = take(make_loader(DS, batch_size=4, seed=5, start=k * 4), 14 - k)
    assert same(resumed, cont[k:])


def test_workers_give_the_same_batches_and_leave_the_global_rng_alone():
    cont = take(make_loader(DS, batch_size=4, seed=5), 14)
    before = torch.get_rng_state()
    full = take(make_loader(DS, batch_size=4, seed=5, num_workers=2), 14)
    resumed = take(make_loader(DS, batch_size=4, seed=5, start=7 * 4, num_workers=2), 7)
    assert torch.equal(torch.get_rng_state(), before)
    assert same(full, cont)
    assert same(resumed, cont[7:])  # crosses the epoch boundary at step 10


class Mixed(Dataset):
    """Samples of many dtypes and shapes, one of them too big to go by value."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {
            "u16": torch.randint(0, 2**16, (5,), generator=g).to(torch.uint16),
            "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
            "flag": torch.tensor(i % 2 == 0),
            "empty": torch.zeros(0, 4),
            "pair": (torch.tensor(float(i)), torch.arange(i, i + 3)),
            "big": torch.full((ship.BY_VALUE_BYTES // 8 + 1,), i, dtype=torch.int64),
            "name": f"s{i}",
        }


def test_worker_batches_come_back_with_the_same_bits_small_ones_by_value():
    main = list(itertools.islice(make_loader(Mixed(), batch_size=2, seed=1), 6))
    in_workers = list(
        itertools.islice(make_loader(Mixed(), batch_size=2, seed=1, num_workers=2), 6)
    )
    for a, b in zip(main, in_workers, strict=True):
        flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
        flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
        assert spec_a == spec_b
        for x, y in zip(flat_a, flat_b, strict=True):
            if isinstance(x, torch.Tensor):
                assert type(y) is torch.Tensor and x.dtype == y.dtype and torch.equal(x, y)
            else:
                assert x == y
        # small tensors came through the pipe (own memory), the big one in shared memory
        assert b["big"].is_shared()
        assert not any(t.is_shared() for k, t in b.items() if k not in ("big", "name", "pair"))
        assert not any(t.is_shared() for t in b["pair"])
    again = pickle.loads(pickle.dumps(ship._pack(main[0]["bf16"])))
    assert type(again) is torch.Tensor and torch.equal(again, main[0]["bf16"])


def test_each_epoch_is_a_permutation_without_its_tail():
    batches = take(make_loader(DS, batch_size=4, seed=5), 10)
    for e in range(2):
        seen = torch.cat(batches[5 * e : 5 * e + 5])
        assert len(set(seen.tolist())) == 20
    assert not torch.equal(torch.cat(batches[:5]), torch.cat(batches[5:]))


# (2) world-size invariance
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_concatenate_to_the_global_batch(world_size):
    size, G, seed, steps = 37, 8, 11, 12  # epoch_len 32: crosses two epoch boundaries
    glob = take(make_loader(TensorDataset(torch.arange(size)), batch_size=G, seed=seed), steps)
    assert same(glob, expected_global(size, G, seed, range(steps)))
    B = G // world_size
    ranks = [
        take(
            make_loader(
                TensorDataset(torch.arange(size)),
                batch_size=B,
                seed=seed,
                world_size=world_size,
                rank=r,
            ),
            steps,
        )
        for r in range(world_size)
    ]
    assert same([torch.cat(parts) for parts in zip(*ranks, strict=True)], glob)


@pytest.mark.parametrize(("world_size", "k"), [(2, 5), (4, 3), (1, 9)])
def test_resume_under_a_different_world_size(world_size, k):
    size, G, seed = 37, 8, 11
    ds = TensorDataset(torch.arange(size))
    # the run was on 2 ranks until step k; its cursor is k * G whatever the world size
    ref = expected_global(size, G, seed, range(k, k + 6))
    ranks = [
        take(
            make_loader(
                ds,
                batch_size=G // world_size,
                seed=seed,
                world_size=world_size,
                rank=r,
                start=k * G,
            ),
            6,
        )
        for r in range(world_size)
    ]
    assert same([torch.cat(parts) for parts in zip(*ranks, strict=True)], ref)


# (3) O(1) restore
def test_restore_in_epoch_a_million_reads_only_what_it_yields():
    ds = Counting(50)  # G = 8: epoch_len 48, 6 batches an epoch
    start = 1_000_000 * 48 + 2 * 8
    t = time.perf_counter()
    got = take(make_loader(ds, batch_size=4, world_size=2, rank=1, seed=3, start=start), 5)
    elapsed = time.perf_counter() - t
    ref = expected_global(50, 8, 3, range(1_000_000 * 6 + 2, 1_000_000 * 6 + 7))
    assert same(got, [b[4:] for b in ref])
    assert sorted(ds.seen) == sorted(torch.cat(got).tolist())
    assert len(ds.seen) == 20
    assert elapsed < 1.0, elapsed


# (4) orders
def test_seeds_and_epochs_give_different_orders_shuffle_false_gives_order():
    s = CursorSampler(100, batch_size=10, seed=0)
    assert not torch.equal(
        s.permutation(0), CursorSampler(100, batch_size=10, seed=1).permutation(0)
    )
    assert not torch.equal(s.permutation(0), s.permutation(1))
    assert torch.equal(s.permutation(0).sort().values, torch.arange(100))
    plain = take(
        make_loader(TensorDataset(torch.arange(10)), batch_size=4, seed=0, shuffle=False), 4
    )
    assert [b.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
    ranked = take(
        make_loader(
            TensorDataset(torch.arange(10)),
            batch_size=2,
            world_size=2,
            rank=1,
            seed=0,
            shuffle=False,
        ),
        3,
    )
    assert [b.tolist() for b in ranked] == [[2, 3], [6, 7], [2, 3]]


# (5) errors
def test_sampler_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"start must be a multiple of the global batch size 8 .*got 12"
    ):
        make_loader(DS, batch_size=4, world_size=2, seed=0, start=12)
    with pytest.raises(
        ValueError, match=r"22 samples, fewer than one global batch of 24 \(12 per rank x 2 ranks\)"
    ):
        make_loader(DS, batch_size=12, world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"rank must be < world_size \(2\), got 2"):
        CursorSampler(22, batch_size=2, world_size=2, rank=2)
    with pytest.raises(ValueError, match=r"start must be an integer >= 0, got -4"):
        CursorSampler(22, batch_size=4, start=-4)
    s = CursorSampler(22, batch_size=4, seed=1)
    with pytest.raises(ValueError, match=r"sampler state has seed=2 but this loader has seed=1"):
        s.load_state_dict({"start": 8, "seed": 2})
    with pytest.raises(
        ValueError, match=r"start must be a multiple of the global batch size 4 .*got 6"
    ):
        s.load_state_dict({"start": 6})


def test_corpus_errors_name_the_argument(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"hello world, " * 50)
    with pytest.raises(DataError, match=r"block_size must be an integer >= 1, got 0"):
        text_corpus(str(f), block_size=0)
    with pytest.raises(DataError, match=r"val_fraction must be a number in \[0, 1\), got 1\.5"):
        text_corpus(str(f), val_fraction=1.5)
    with pytest.raises(DataError, match=r"max_bytes must be an integer >= 1, got -1"):
        text_corpus(str(f), max_bytes=-1)
    with pytest.raises(DataError, match=r"too short for one training block of block_size 1000"):
        text_corpus(str(f), block_size=1000)
    missing = tmp_path / "nope.txt"
    with pytest.raises(
        DataError, match=r"data path '.*nope\.txt' does not exist; give an existing text file"
    ):
        text_corpus(str(missing))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pic.bin").write_bytes(b"\x89PNG\0\0")
    with pytest.raises(DataError, match=r"data path '.*empty' holds no text"):
        read_text(tmp_path / "empty")
    assert issubclass(DataError, ValueError)


# (6) global RNG
def test_loader_and_fingerprint_leave_the_global_rng_alone():
    class Noisy(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.rand(2)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    take(make_loader(DS, batch_size=4, seed=5, start=8), 6)
    fingerprint(Noisy(), batch_size=4, shuffle=True, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


# (7) fingerprints
def test_fingerprint_sees_one_byte_and_every_setting():
    text = bytes(range(256)) * 8
    base = fingerprint(ByteBlocks(text, 16), batch_size=32, shuffle=True, seed=1)
    assert base == fingerprint(ByteBlocks(text, 16), batch_size=32, shuffle=True, seed=1)
    assert base["size"] == (len(text) - 1) // 16 and len(base["content"]) == 64
    assert fingerprint_changes(base, base) == []
    flipped = text[:1000] + b"\xff" + text[1001:]
    new = fingerprint(ByteBlocks(flipped, 16), batch_size=64, shuffle=False, seed=2)
    a, b = base["content"][:6], new["content"][:6]
    assert a != b
    assert fingerprint_changes(base, new) == [
        f"data content changed (sha256 {a}… -> {b}…): the dataset's files differ from the run's",
        "global batch size 32 -> 64",
        "shuffle True -> False",
        "data shuffling seed 1 -> 2",
    ]
    other_block = fingerprint(ByteBlocks(text, 8), batch_size=32, shuffle=True, seed=1)
    assert (
        fingerprint_changes(base, other_block)[0]
        == f"dataset size {base['size']} -> {other_block['size']} samples"
    )


def test_fingerprint_of_tensor_and_plain_datasets():
    x = torch.arange(1000, dtype=torch.float32)
    y = x.clone()
    y[999] = -1.0  # a TensorDataset is hashed whole: the last element counts
    fx = fingerprint(TensorDataset(x), batch_size=4, shuffle=True, seed=0)
    assert (
        fx["content"]
        != fingerprint(TensorDataset(y), batch_size=4, shuffle=True, seed=0)["content"]
    )

    class Plain(Dataset):
        def __init__(self, values):
            self.values = values

        def __len__(self):
            return len(self.values)

        def __getitem__(self, i):
            return {"x": torch.tensor([i]), "label": self.values[i]}

    vals = list(range(600))
    base = fingerprint(Plain(vals), batch_size=4, shuffle=True, seed=0)
    sampled = [j * 600 // 256 for j in range(256)]
    changed, unsampled = list(vals), list(vals)
    changed[sampled[100]] = "x"
    unsampled[sampled[100] + 1] = "x"  # between two sampled indices: documented as unseen
    assert (
        fingerprint(Plain(changed), batch_size=4, shuffle=True, seed=0)["content"]
        != base["content"]
    )
    assert (
        fingerprint(Plain(unsampled), batch_size=4, shuffle=True, seed=0)["content"]
        == base["content"]
    )


# (8) corpus
def test_default_corpus_is_deterministic_and_non_empty():
    a = read_text(max_bytes=300_000)
    assert len(a) == 300_000
    assert a == read_text(None, max_bytes=300_000)
    assert read_text(max_bytes=1000) == a[:1000]


def test_default_corpus_selection(tmp_path, monkeypatch):
    files = {
        "b/c.py": b"C",
        "a.py": b"A",
        "zz.py": b"Z",
        "notes.txt": b"no",
        "site-packages/x.py": b"no",
        "test/t.py": b"no",
        "lib2to3/tests/t.py": b"no",
        "idlelib/i.py": b"no",
        "turtledemo/d.py": b"no",
        "b/a.py": b"B",
    }
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert read_text() == b"ABCZ"
    assert read_text(max_bytes=2) == b"AB"


def test_folder_and_file(tmp_path):
    for rel, content in {
        "b.txt": b"2",
        "a/z.txt": b"1",
        ".hidden": b"no",
        ".git/HEAD": b"no",
        "img.bin": b"x" * 100 + b"\0",
        "c.md": b"3",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    assert read_text(tmp_path) == b"123"
    assert read_text(str(tmp_path / "img.bin")) == b"x" * 100 + b"\0"  # a file is taken as given
    assert read_text(tmp_path / "b.txt") == b"2"


def test_byte_blocks_and_text_corpus_split(tmp_path):
    text = bytes(range(200))
    ds = ByteBlocks(text, 10)
    assert len(ds) == 19
    x, y = ds[3]
    assert (
        x.dtype == torch.int64
        and torch.equal(x, torch.arange(30, 40))
        and torch.equal(y, torch.arange(31, 41))
    )
    assert torch.equal(ds[-1][1], torch.arange(181, 191))
    with pytest.raises(IndexError, match="index 19 out of range for 19 blocks"):
        ds[19]
    f = tmp_path / "t.bin"
    f.write_bytes(text)
    splits = text_corpus(str(f), block_size=10, val_fraction=0.1, max_bytes=None)
    assert len(splits["val"]) == 2 and torch.equal(splits["val"][1][1], torch.arange(190, 200))
    assert len(splits["train"]) == 17 and torch.equal(
        splits["train"][16][1], torch.arange(161, 171)
    )
    assert set(text_corpus(str(f), block_size=10, val_fraction=0)) == {"train"}
    xb, yb = next(iter(make_loader(splits["train"], batch_size=4, seed=0)))
    assert xb.shape == (4, 10) and torch.equal(xb[:, 1:], yb[:, :-1])


def test_stateful_dataloader_round_trip():
    ds = TensorDataset(torch.arange(22))
    one = make_loader(ds, batch_size=2, world_size=2, rank=1, seed=9)
    it = iter(one)
    for _ in range(7):
        next(it)
    state = orjson.loads(orjson.dumps(one.state_dict()))  # plain JSON data
    rest = [next(it)[0] for _ in range(6)]
    two = make_loader(ds, batch_size=2, world_size=2, rank=1, seed=9)
    two.load_state_dict(state)
    assert same(take(two, 6), rest)
    assert same(
        rest, take(make_loader(ds, batch_size=2, world_size=2, rank=1, seed=9, start=7 * 4), 6)
    )


def test_only_the_set_vital_warning_is_filtered():
    class Warns(TensorDataset):
        def __len__(self):
            warnings.warn("a user warning that must get through", UserWarning, stacklevel=2)
            return super().__len__()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        take(make_loader(Warns(torch.arange(8)), batch_size=2, seed=0), 2)
    messages = [str(w.message) for w in seen]
    assert "a user warning that must get through" in messages
    assert not any("set_vital" in m for m in messages)
