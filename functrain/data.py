"""Data: a loader rebuilt from one int, fingerprints of the data, the default text corpus.

The state's data cursor is the number of *global* samples consumed since the start of
training. The order of samples is a pure function of (seed, epoch), and rank r of W takes
its slice of each global batch, so `make_loader(..., start=cursor)` yields exactly what an
uninterrupted run would have yielded next — in O(1), with any number of workers, under any
world size that divides the global batch.

>>> ds = torch.utils.data.TensorDataset(torch.arange(10))
>>> [b[0].tolist() for b, _ in zip(make_loader(ds, batch_size=2, seed=0, shuffle=False, start=8), range(3))]
[[8, 9], [0, 1], [2, 3]]
"""

from __future__ import annotations

import hashlib
import operator
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from functrain.rng import fold_in

_FINGERPRINT_SAMPLES = 256  # samples hashed for datasets with neither fingerprint() nor tensors
_BINARY_PROBE = 8192  # a file with a NUL byte in its first 8 KiB is taken for binary
_SKIP_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo"}
)


class DataError(ValueError):
    """A data source or data argument the user gave cannot be used."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit non-negative seed from a blake2b hash of the parts (never Python's `hash()`).

    >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    True
    """
    return fold_in(*parts)


def _as_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int >= minimum, or a DataError (a ValueError) naming the argument."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return operator.index(value)


class _CursorIter(Iterator[int]):
    """One pass of a CursorSampler from its start; counts what it handed out."""

    def __init__(self, sampler: CursorSampler, start: int) -> None:
        self._s = sampler
        self.start = start
        self.yielded = 0  # indices of this rank handed out
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)
        self._batch: list[int] = []

    def position(self) -> int:
        """Global samples consumed: whole per-rank batches handed out, times G."""
        return self.start + (self.yielded // self._s.batch_size) * self._s.global_batch

    def __next__(self) -> int:
        s, j = self._s, self.yielded % self._s.batch_size
        if j == 0:  # a new batch: this rank's slice of the global batch at position()
            epoch, offset = divmod(self.position(), s.epoch_len)
            if epoch != self._epoch:  # one permutation per epoch, computed once
                self._epoch, self._order = epoch, s.permutation(epoch)
            lo = offset + s.rank * s.batch_size
            self._batch = self._order[lo : lo + s.batch_size].tolist()
        self.yielded += 1  # before returning, so position() counts a batch once it is taken
        return self._batch[j]


class CursorSampler(Sampler[int]):
    """Infinite stream of this rank's sample indices, positioned by global samples consumed.

    `batch_size` is the per-rank batch B; G = B * world_size. An epoch is the first
    `(size // G) * G` positions of a permutation of `range(size)` drawn from
    `derive_seed(seed, epoch)` (identity when `shuffle=False`); global batch s is positions
    `[s*G, (s+1)*G)` and rank r takes `[s*G + r*B, s*G + (r+1)*B)`. `start` (a multiple of
    G) is where the stream begins; nothing before it is computed.
    """

    def __init__(
        self,
        size: int,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        self.size = _as_int("size", size, 0)
        self.batch_size = _as_int("batch_size", batch_size, 1)
        self.world_size = _as_int("world_size", world_size, 1)
        self.rank = _as_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise DataError(f"rank must be < world_size ({self.world_size}), got {self.rank}")
        self.seed = _as_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.global_batch = self.batch_size * self.world_size
        if self.size < self.global_batch:
            raise DataError(
                f"the dataset has {self.size} samples, fewer than one global batch of "
                f"{self.global_batch} ({self.batch_size} per rank x {self.world_size} ranks); "
                "use a smaller batch_size or more data"
            )
        self.epoch_len = (self.size // self.global_batch) * self.global_batch
        self.start = self._check_start(start)
        self._live: _CursorIter | None = None

    def _check_start(self, start: Any) -> int:
        start = _as_int("start", start, 0)
        if start % self.global_batch:
            raise DataError(
                f"start must be a multiple of the global batch size {self.global_batch} "
                f"(global samples consumed at a step boundary), got {start}"
            )
        return start

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of `range(size)` in `epoch` (identity when not shuffling), int64."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        self._live = _CursorIter(self, self.start)
        return self._live

    def state_dict(self) -> dict[str, int | bool]:
        """Plain ints/bools: where the live iterator stands, and what the order depends on."""
        start = self._live.position() if self._live is not None else self.start
        return {
            "start": start,
            "size": self.size,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state["start"]`; the other fields must match this sampler."""
        if "start" not in state:
            raise DataError(f"sampler state has no 'start' entry: {state!r}")
        ours = self.state_dict()
        for k in ("size", "global_batch", "seed", "shuffle"):
            if k in state and state[k] != ours[k]:
                raise DataError(
                    f"sampler state has {k}={state[k]!r} but this loader has {k}={ours[k]!r}; "
                    "resume with the data and batch settings the state was saved with"
                )
        self.start = self._check_start(state["start"])
        self._live = None


def make_loader(
    dataset,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    start: int = 0,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    collate_fn=None,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """A StatefulDataLoader yielding this rank's batches forever, from `start` global samples.

    `batch_size` is per rank. The global torch RNG is never drawn from: the loader's own
    generator (which seeds the workers) is derived from (seed, rank).
    """
    sampler = CursorSampler(
        len(dataset),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle=shuffle,
        start=start,
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, "loader", rank))
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in newer torch, on every construction.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=_as_int("num_workers", num_workers, 0),
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            generator=generator,
        )


def _hash_value(h: Any, value: Any) -> None:
    """Feed one sample into a hash: tensors by dtype, shape and bytes; containers recursively."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}:{len(value)}:".encode())
        for v in value:
            _hash_value(h, v)
    elif isinstance(value, dict):
        h.update(f"dict:{len(value)}:".encode())
        for k, v in value.items():
            h.update(repr(k).encode())
            _hash_value(h, v)
    else:
        h.update(f"repr:{value!r};".encode())


def _content_hash(dataset) -> str:
    h = hashlib.sha256()
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        h.update(b"fingerprint:" + str(own()).encode())
    elif isinstance(dataset, TensorDataset):
        _hash_value(h, list(dataset.tensors))
    else:
        n = len(dataset)
        k = min(n, _FINGERPRINT_SAMPLES)
        with torch.random.fork_rng(devices=[]):  # a random __getitem__ must not move our RNG
            for j in range(k):
                i = j * n // k
                h.update(f"sample:{i}:".encode())
                _hash_value(h, dataset[i])
    return h.hexdigest()


def fingerprint(dataset, *, batch_size: int, shuffle: bool, seed: int) -> dict:
    """What a run's sample order depends on: size, content hash, global batch, shuffle, seed.

    The content hash is sha256 of: the dataset's own `fingerprint()` string if it has one;
    else, for a TensorDataset, all its tensors' bytes; else up to 256 evenly spaced samples
    (tensors by dtype, shape and bytes, other values by `repr`) — so a change elsewhere in
    such a dataset, or a random `__getitem__`, is not caught or gives a varying hash.
    """
    return {
        "size": len(dataset),
        "content": _content_hash(dataset),
        "batch_size": batch_size,
        "shuffle": bool(shuffle),
        "seed": seed,
    }


_CHANGED = {  # one sentence per fingerprint field, in this order
    "size": "dataset size {a} -> {b} samples",
    "content": "data content changed (sha256 {a!s:.6}… -> {b!s:.6}…): "
    "the dataset's files differ from the run's",
    "batch_size": "global batch size {a} -> {b}",
    "shuffle": "shuffle {a} -> {b}",
    "seed": "data shuffling seed {a} -> {b}",
}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """One human sentence per field that differs between two fingerprints; [] when equal."""
    extra = sorted((set(old) | set(new)) - set(_CHANGED), key=str)
    return [
        _CHANGED.get(key, f"data {key} {{a!r}} -> {{b!r}}").format(
            a=old.get(key, "(none)"), b=new.get(key, "(none)")
        )
        for key in (*_CHANGED, *extra)
        if old.get(key) != new.get(key)
    ]


class ByteBlocks(Dataset):
    """Byte-level language-model samples: `(x, y)` int64 blocks, `y` shifted one byte on.

    >>> x, y = ByteBlocks(b"abcdefg", block_size=3)[1]
    >>> bytes(x.tolist()), bytes(y.tolist())
    (b'def', b'efg')
    """

    def __init__(self, data: bytes, block_size: int) -> None:
        block_size = _as_int("block_size", block_size, 1)
        if len(data) < block_size + 1:
            raise DataError(
                f"ByteBlocks needs at least block_size + 1 = {block_size + 1} bytes, got "
                f"{len(data)}; give more text or a smaller block_size"
            )
        self.block_size = block_size
        self._bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return (len(self._bytes) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"ByteBlocks index {i} out of range for {n} blocks")
        lo = (i % n) * self.block_size
        block = self._bytes[lo : lo + self.block_size + 1].long()
        return block[:-1], block[1:]

    def fingerprint(self) -> str:
        """sha256 of the block size and the bytes."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"ByteBlocks:{self.block_size}:".encode())
            h.update(self._bytes.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _walk(
    root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]
) -> list[Path]:
    """The files under `root` whose folders and names are kept, sorted by relative path."""
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if keep_dir(x)]
        found += [Path(d, f) for f in files if keep_file(f)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_PROBE)


def _concat(files: list[Path], max_bytes: int | None) -> bytes:
    parts, total = [], 0
    for p in files:
        if max_bytes is not None and total >= max_bytes:
            break
        parts.append(p.read_bytes())
        total += len(parts[-1])
    data = b"".join(parts)
    return data if max_bytes is None else data[:max_bytes]


def read_text(path: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a text file, of a folder's text files, or of the default corpus.

    `None` is the default corpus, needing no download: the source of this Python's standard
    library (`*.py`, sorted by relative path, without site-packages and the test, tests,
    idlelib and turtledemo trees). A folder gives its files concatenated in relative-path
    order, skipping hidden files and folders and binary files (a NUL byte in the first
    8 KiB). The result is cut to `max_bytes`.
    """
    max_bytes = None if max_bytes is None else _as_int("max_bytes", max_bytes, 1)
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, lambda d: d not in _SKIP_STDLIB_DIRS, lambda f: f.endswith(".py"))
        data = _concat(files, max_bytes)
        where = f"the default corpus (Python standard library at {root})"
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(
                f"data path {str(p)!r} does not exist; give an existing text file or folder, "
                "or null for the default corpus (the Python standard library's source)"
            )
        files = [p]
        if p.is_dir():
            visible = _walk(p, lambda d: not d.startswith("."), lambda f: not f.startswith("."))
            files = [f for f in visible if f.is_file() and not _is_binary(f)]
        data = _concat(files, max_bytes)
        where = f"data path {str(p)!r}"
    if not data:
        raise DataError(
            f"{where} holds no text (empty, or only hidden or binary files); "
            "give a non-empty text file or a folder of text files"
        )
    return data


def text_corpus(
    path: str | None = None,
    *,
    block_size: int = 128,
    val_fraction: float = 0.05,
    max_bytes: int | None = 8_000_000,
) -> dict[str, ByteBlocks]:
    """Byte-level train/val splits of `read_text(path)`: {"train": ..., "val": ...}.

    The last `val_fraction` of the bytes, in whole blocks (at least one), is "val"; the rest
    is "train". `val_fraction=0` gives no "val" entry.
    """
    block_size = _as_int("block_size", block_size, 1)
    number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not (number and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    data = read_text(path, max_bytes=max_bytes)
    n_val = max(1, round(len(data) * val_fraction / block_size)) if val_fraction else 0
    cut = len(data) - n_val * block_size - 1 if n_val else len(data)
    if cut < block_size + 1:
        raise DataError(
            f"the text ({len(data)} bytes) is too short for one training block of block_size "
            f"{block_size} besides {n_val} validation block(s); give more text "
            "(max_bytes, path) or lower block_size or val_fraction"
        )
    splits = {"train": ByteBlocks(data[:cut], block_size)}
    if n_val:
        splits["val"] = ByteBlocks(data[cut:], block_size)
    return splits
