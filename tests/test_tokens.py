"""Token files: windows of a memory-mapped token stream, shards, splits, fingerprints."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import orjson
import pytest
import torch
from conftest import cli

from functrain import checkpoint
from functrain.data import DataError, TokenWindows, make_loader, prepare, token_file

ROOT = Path(__file__).resolve().parents[1]


def write_tokens(path: Path, tokens: torch.Tensor, dtype=torch.uint16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(tokens.to(dtype).contiguous().view(torch.uint8).numpy()))
    return path


def test_windows_are_consecutive_tokens_shifted_by_one(tmp_path):
    f = write_tokens(tmp_path / "t.bin", torch.arange(1000))
    ds = TokenWindows([f], block_size=16)
    assert len(ds) == (1000 - 1) // 16
    x, y = ds[2]
    assert x.dtype == torch.int64 and torch.equal(x, torch.arange(32, 48))
    assert torch.equal(y, torch.arange(33, 49))
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_uint32_tokens_beyond_uint16(tmp_path):
    tokens = torch.arange(100_000, 100_100)
    f = write_tokens(tmp_path / "t.bin", tokens, torch.uint32)
    x, _ = token_file(str(f), block_size=8, dtype="uint32", val_fraction=0)["train"][0]
    assert torch.equal(x, tokens[:8])


def test_shards_in_name_order_and_no_window_crosses_them(tmp_path):
    write_tokens(tmp_path / "s" / "b.bin", torch.arange(100, 150))  # 50 tokens: 6 windows of 8
    write_tokens(tmp_path / "s" / "a.bin", torch.arange(0, 20))  # 20 tokens: 2 windows
    write_tokens(tmp_path / "s" / ".hidden.bin", torch.arange(5))
    ds = token_file(str(tmp_path / "s"), block_size=8, val_fraction=0)["train"]
    assert [s.name for s in ds.shards] == ["a.bin", "b.bin"] and len(ds) == 2 + 6
    firsts = [int(ds[i][0][0]) for i in range(len(ds))]
    assert firsts == [0, 8, 100, 108, 116, 124, 132, 140]
    assert all(int(y[-1]) - int(x[0]) == 8 for x, y in (ds[i] for i in range(len(ds))))


def test_held_out_tail_and_nanogpt_folders(tmp_path):
    f = write_tokens(tmp_path / "t.bin", torch.arange(1601))  # 100 windows of 16
    splits = token_file(str(f), block_size=16, val_fraction=0.1)
    train, val = splits["train"], splits["val"]
    assert (len(train), len(val)) == (89, 10)  # one window apart: no shared token
    assert int(train[len(train) - 1][1][-1]) < int(val[0][0][0])
    assert torch.equal(val[len(val) - 1][1], torch.arange(1585, 1601))
    write_tokens(tmp_path / "nano" / "train.bin", torch.arange(200))
    write_tokens(tmp_path / "nano" / "val.bin", torch.arange(500, 600))
    nano = token_file(str(tmp_path / "nano"), block_size=16)
    assert len(nano["train"]) == 12 and int(nano["val"][0][0][0]) == 500


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "nothing"), "does not exist"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "holds no token files"),
        (lambda d: write_tokens(d / "odd.bin", torch.arange(3), torch.uint8), "not a whole number"),
        (lambda d: write_tokens(d / "short.bin", torch.arange(8)), "too few for windows"),
    ],
)
def test_unusable_token_files_are_named(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        token_file(make(tmp_path), block_size=8, val_fraction=0)


def test_files_are_mapped_not_read(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(256 << 20)  # sparse: 256 MiB of zeros the disk does not hold
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20  # noqa: E731
    before = rss()
    ds = token_file(str(big), block_size=1024, val_fraction=0)["train"]
    for i in range(0, len(ds), len(ds) // 50):
        ds[i]
    assert rss() - before < 32  # MiB: far less than the file
    clone = pickle.loads(pickle.dumps(ds))  # what a worker gets: paths, no mapped memory
    assert clone._maps is None and torch.equal(clone[7][0], ds[7][0])


def test_fingerprint_sees_size_and_sampled_bytes(tmp_path):
    tokens = torch.arange(50_000) % 1000
    f = write_tokens(tmp_path / "t.bin", tokens)
    fp = token_file(str(f), block_size=64, val_fraction=0)["train"].fingerprint()
    assert fp == token_file(str(f), block_size=64, val_fraction=0)["train"].fingerprint()
    assert fp != token_file(str(f), block_size=32, val_fraction=0)["train"].fingerprint()
    changed = tokens.clone()
    changed[0] += 1  # the first chunk is always hashed
    write_tokens(f, changed)
    assert fp != token_file(str(f), block_size=64, val_fraction=0)["train"].fingerprint()
    write_tokens(f, torch.cat([tokens, tokens[:1]]))  # one token more
    assert fp != token_file(str(f), block_size=64, val_fraction=0)["train"].fingerprint()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_token_windows_at_the_cursor(tmp_path, workers):
    f = write_tokens(tmp_path / "t.bin", torch.randint(0, 50_000, (20_000,)))
    ds = token_file(str(f), block_size=32, val_fraction=0)["train"]
    kw = dict(batch_size=8, seed=3, num_workers=workers)
    straight = make_loader(ds, **kw)
    want = [b for b, _ in zip(straight, range(90), strict=False)]  # 624 windows: epoch 2
    resumed = make_loader(ds, start=8 * 60, **kw)
    got = [b for b, _ in zip(resumed, range(30), strict=False)]
    pairs = zip(got, want[60:], strict=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


# ---------------------------------------------------------------- prepare


def test_prepare_streams_text_into_train_and_val_token_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"second file\n" * 50)
    (src / "sub" / "a.txt").write_bytes("première\n".encode() * 40)  # non-ASCII: bytes
    (src / ".hidden.txt").write_bytes(b"never")
    (src / "image.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    text = (src / "b.txt").read_bytes() + (src / "sub" / "a.txt").read_bytes()
    seen = []
    meta = prepare(
        [src], tmp_path / "out", val_fraction=0.1, progress=lambda d, t: seen.append((d, t))
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert meta["tokens"] == {
        "train": len(text) - round(len(text) * 0.1),
        "val": round(len(text) * 0.1),
    }
    tokens = torch.cat(
        [
            torch.frombuffer(bytearray((out / f).read_bytes()), dtype=torch.uint16)
            for f in ("train.bin", "val.bin")
        ]
    )
    assert torch.equal(tokens.to(torch.int64), torch.tensor(list(text)))
    assert seen[-1] == (len(text), len(text))
    splits = token_file(str(out), block_size=16)
    assert len(splits["train"]) == (meta["tokens"]["train"] - 1) // 16
    assert len(splits["val"]) == (meta["tokens"]["val"] - 1) // 16
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(DataError, match="already exists"):
        prepare([src], out)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_prepare_then_train_the_recipe_and_resume_it_bitwise(tmp_path):
    data = tmp_path / "stdlib"
    res = cli("prepare", "--out", data, "--max-bytes", 150_000, check=False)
    assert res.returncode == 0 and "wrote" in res.stderr, res.stderr
    recipe = ROOT / "recipes" / "gpt_tokens.yaml"
    small = ("model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.batch_size=8")
    args = (f"out_dir={tmp_path}", f"data.dataset.path={data}", "steps=8", *small)
    args += ("schedule.warmup_steps=2",)
    args += ("checkpoint.every=4", "log_every=2", "eval.every=4", "eval.batches=1")
    res = cli("run", recipe, *args, check=False)
    assert res.returncode == 0, res.stderr
    res = cli("resume", recipe, *args, "--from", "state_4", "--name", "again", check=False)
    assert res.returncode == 0, res.stderr
    full, again = tmp_path / "gpt_tokens" / "state_8", tmp_path / "again" / "state_8"
    assert checkpoint.digests(again) == checkpoint.digests(full)
    assert (tmp_path / "again" / "metrics.jsonl").read_text().count('"step"') == 4


def test_token_files_resumed_from_two_ranks_on_one_keep_the_global_sample_order(tmp_path):
    """torchrun with 2 ranks, then 1 process from its snapshot: the same global batches
    (traced per step), the same LR; params close, not bitwise (see test_dist.py)."""
    from _dist_common import launch, metrics, trace

    tokens = torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(3))
    path = write_tokens(tmp_path / "t.bin", tokens)
    recipe = ROOT / "recipes" / "gpt_tokens.yaml"
    args = (f"out_dir={tmp_path}", f"data.dataset.path={path}", "data.dataset.val_fraction=0.1")
    args += ("model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.0")
    args += ("data.batch_size=8", "steps=8", "schedule.warmup_steps=2", "checkpoint.every=4")
    args += ("log_every=1", "eval.every=null")
    launch(2, "run", recipe, *args, "name=two", trace=tmp_path / "trace_two")
    res = launch(1, "resume", recipe, *args, "name=two", "--from", "state_4", "--name", "one",
                 trace=tmp_path / "trace_one")  # fmt: skip
    assert "close to, not bitwise" in res.stderr
    assert trace(tmp_path / "trace_one") == trace(tmp_path / "trace_two")[4:]
    lrs = [r["lr"] for r in metrics(tmp_path / "two")]
    assert [r["lr"] for r in metrics(tmp_path / "one")] == lrs  # the branch keeps the history


def _tiny_tokenizer(tmp_path: Path, text: str) -> Path:
    """A byte-level BPE tokenizer trained here, on `text` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([text], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_prepare_with_a_tokenizer_writes_its_ids_and_token_file_reads_them(tmp_path):
    from tokenizers import Tokenizer

    text = "".join(
        f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(3000)
    )
    (tmp_path / "corpus.txt").write_text(text)
    path = _tiny_tokenizer(tmp_path, text)
    res = cli("prepare", tmp_path / "corpus.txt", "--out", tmp_path / "tok", "--tokenizer", path,
              "--val-fraction", "0.1")  # fmt: skip
    assert "tokenizers:tokenizer.json, vocab 300" in res.stderr, res.stderr
    meta = orjson.loads((tmp_path / "tok" / "meta.json").read_bytes())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert len(meta["tokenizer_sha256"]) == 64
    ids = torch.cat([torch.from_file(str(tmp_path / "tok" / f), size=n, dtype=torch.uint16)
                     for f, n in (("train.bin", meta["tokens"]["train"]),
                                  ("val.bin", meta["tokens"]["val"]))])  # fmt: skip
    assert Tokenizer.from_file(str(path)).decode(ids.tolist()) == text  # lossless
    assert ids.numel() < len(text) / 2  # and compressed: merges took effect
    splits = token_file(str(tmp_path / "tok"), block_size=16)
    assert int(splits["train"][0][0].max()) < 300
    with pytest.raises(DataError, match="says the tokens are uint16"):
        token_file(str(tmp_path / "tok"), block_size=16, dtype="uint32")


def test_prepare_names_the_extra_when_tokenizers_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    (tmp_path / "a.txt").write_text("some text\n")
    with pytest.raises(DataError, match=r"pip install 'functrain\[tokenizers\]'"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tmp_path / "t.json")
    assert not (tmp_path / "out").exists()
