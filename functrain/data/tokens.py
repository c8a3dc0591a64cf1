"""Token files: flat binary files of token ids (nanoGPT's `.bin`), read through a memory map.

A token file holds token ids as raw little-endian `uint16` (nanoGPT's `train.bin`) or
`uint32`, nothing else; a folder of them is read as shards in name order. A sample is a
window of `block_size + 1` consecutive tokens, `(x, y)` with `y` shifted one token on:
window j of a shard starts at token `j * block_size`, and no window crosses from one shard
into the next. The files are mapped (`torch.from_file`), never loaded whole: a sample
touches only its own pages, so a corpus far larger than memory trains as a map-style
dataset, and the data cursor resumes it in O(1) like any other.

>>> splits = token_file("data/tokens", block_size=256)   # doctest: +SKIP
>>> x, y = splits["train"][0]                           # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from functrain.data._args import as_int
from functrain.errors import DataError

__all__ = ["TokenWindows", "token_file"]

DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}
_PROBES = 16  # chunks hashed per shard by `fingerprint`, first and last among them
_PROBE_BYTES = 4096


class TokenWindows(Dataset):
    """Windows `[lo, hi)` of the shards' windows (all by default), as `(x, y)` int64 pairs."""

    def __init__(
        self,
        shards: list[Path],
        *,
        block_size: int,
        dtype: str = "uint16",
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise DataError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.block_size = as_int("block_size", block_size, 1)
        self.dtype = dtype
        self.shards = [Path(s) for s in shards]
        itemsize = DTYPES[dtype].itemsize
        self._tokens = [_token_count(s, itemsize) for s in self.shards]
        counts = [max(0, (n - 1) // self.block_size) for n in self._tokens]
        self._starts = [0, *itertools.accumulate(counts)][:-1]  # first window of each shard
        total = sum(counts)
        self.lo, self.hi = lo, total if hi is None else hi
        if not 0 <= self.lo < self.hi <= total:
            raise DataError(
                f"token files {_names(self.shards)} hold {total} windows of block_size "
                f"{self.block_size} + 1 tokens, too few for windows [{lo}, {hi}); give more "
                "tokens or a smaller block_size"
            )
        self._maps: list[torch.Tensor] | None = None  # opened on first use, in each worker

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"TokenWindows index {i} out of range for {n} windows")
        window = self.lo + i % n
        shard = bisect.bisect_right(self._starts, window) - 1
        start = (window - self._starts[shard]) * self.block_size
        block = self._mapped()[shard][start : start + self.block_size + 1].to(torch.int64)
        return block[:-1], block[1:]

    def _mapped(self) -> list[torch.Tensor]:
        if self._maps is None:
            self._maps = [
                torch.from_file(str(s), shared=False, size=n, dtype=DTYPES[self.dtype])
                for s, n in zip(self.shards, self._tokens, strict=True)
            ]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:  # a worker maps the files itself
        return {**self.__dict__, "_maps": None}

    def fingerprint(self) -> str:
        """sha256 of the dtype, block size, window range, each shard's name and size, and
        16 chunks of 4 KiB per shard (its first, its last, and evenly spaced between)."""
        h = hashlib.sha256(
            f"TokenWindows:{self.dtype}:{self.block_size}:{self.lo}:{self.hi}".encode()
        )
        for shard in self.shards:
            size = shard.stat().st_size
            h.update(f"|{shard.name}:{size}|".encode())
            with open(shard, "rb") as f:
                for k in range(_PROBES):
                    f.seek(k * max(0, size - _PROBE_BYTES) // (_PROBES - 1))
                    h.update(f.read(_PROBE_BYTES))
        return h.hexdigest()


def token_file(
    path: str,
    *,
    block_size: int = 128,
    dtype: str | None = None,
    val_path: str | None = None,
    val_fraction: float = 0.05,
) -> dict[str, TokenWindows]:
    """Train/val splits of token files: {"train": ..., "val": ...}.

    `path` is a token file, a folder of token-file shards (`*.bin`, in name order), or a
    nanoGPT data folder holding `train.bin` (and `val.bin`, taken as the validation file).
    Validation comes from `val_path` (a file or folder) when given, else from the last
    `val_fraction` of the windows (at least one; one window is left out between the two so
    that no token is shared); `val_fraction=0` gives no "val" entry. `dtype` (`uint16` or
    `uint32`) defaults to what the folder's `meta.json` (written by `prepare`) says, else
    `uint16`.
    """
    dtype = _dtype(Path(path), dtype)
    train, nanogpt_val = _shards(path, "path")
    val_path = val_path if val_path is not None else nanogpt_val
    if val_path is not None:
        val, _ = _shards(val_path, "val_path")
        return {
            "train": TokenWindows(train, block_size=block_size, dtype=dtype),
            "val": TokenWindows(val, block_size=block_size, dtype=dtype),
        }
    number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not (number and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    whole = TokenWindows(train, block_size=block_size, dtype=dtype)
    n_val = max(1, round(len(whole) * val_fraction)) if val_fraction else 0
    if not n_val:
        return {"train": whole}
    cut = len(whole) - n_val - 1  # one window apart: its last target is val's first token
    return {
        "train": TokenWindows(train, block_size=block_size, dtype=dtype, hi=cut),
        "val": TokenWindows(train, block_size=block_size, dtype=dtype, lo=cut + 1),
    }


def _dtype(path: Path, dtype: str | None) -> str:
    """`dtype`, checked against (or, when None, taken from) `prepare`'s meta.json in `path`."""
    meta_file = path / "meta.json"
    wrote = None
    if path.is_dir() and meta_file.is_file():
        try:
            wrote = json.loads(meta_file.read_text()).get("dtype")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"{meta_file} is not a readable meta.json: {err}") from err
    if dtype is not None and wrote is not None and dtype != wrote:
        raise DataError(
            f"dtype: {dtype} was given, but {meta_file} says the tokens are {wrote}; "
            "drop dtype (it follows meta.json) or give the one the files were written with"
        )
    return dtype or wrote or "uint16"


def _shards(path: str | os.PathLike, field: str) -> tuple[list[Path], str | None]:
    """The token files of `path`, and a nanoGPT folder's val.bin (else None)."""
    p = Path(path)
    if p.is_file():
        return [p], None
    if not p.is_dir():
        raise DataError(f"{field} {str(p)!r} does not exist; give a token file or a folder of them")
    if (p / "train.bin").is_file():
        val = p / "val.bin"
        return [p / "train.bin"], str(val) if val.is_file() else None
    shards = sorted(f for f in p.iterdir() if f.suffix == ".bin" and not f.name.startswith("."))
    if not shards:
        raise DataError(f"{field} {str(p)!r} holds no token files (*.bin)")
    return shards, None


def _token_count(path: Path, itemsize: int) -> int:
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(
            f"token file {path} has {size} bytes, not a whole number of {itemsize}-byte "
            "tokens: is dtype right (uint16 or uint32)?"
        )
    return size // itemsize


def _names(shards: list[Path]) -> str:
    return ", ".join(s.name for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
