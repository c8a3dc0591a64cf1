"""Text as data: byte-level `ByteBlocks`, `read_text` of files and folders, `text_corpus`.

The default corpus, needing no download, is the source of this Python's standard library.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from functrain.data._args import as_int
from functrain.errors import DataError

_BINARY_PROBE = 8192  # a file with a NUL byte in its first 8 KiB is taken for binary
_SKIP_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo"}
)


class ByteBlocks(Dataset):
    """Byte-level language-model samples: `(x, y)` int64 blocks, `y` shifted one byte on.

    >>> x, y = ByteBlocks(b"abcdefg", block_size=3)[1]
    >>> bytes(x.tolist()), bytes(y.tolist())
    (b'def', b'efg')
    """

    def __init__(self, data: bytes, block_size: int) -> None:
        block_size = as_int("block_size", block_size, 1)
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


def text_files(path: str | os.PathLike | None = None) -> tuple[list[Path], str]:
    """The files `read_text(path)` reads, in order, and words naming where they are.

    `None` is the default corpus, needing no download: the source of this Python's standard
    library (`*.py`, sorted by relative path, without site-packages and the test, tests,
    idlelib and turtledemo trees). A folder gives its files in relative-path order, skipping
    hidden files and folders and binary files (a NUL byte in the first 8 KiB).
    """
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, lambda d: d not in _SKIP_STDLIB_DIRS, lambda f: f.endswith(".py"))
        return files, f"the default corpus (Python standard library at {root})"
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"data path {str(p)!r} does not exist; give an existing text file or folder, "
            "or null for the default corpus (the Python standard library's source)"
        )
    if not p.is_dir():
        return [p], f"data path {str(p)!r}"
    visible = _walk(p, lambda d: not d.startswith("."), lambda f: not f.startswith("."))
    return [f for f in visible if f.is_file() and not _is_binary(f)], f"data path {str(p)!r}"


def read_text(path: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a text file, of a folder's text files, or of the default corpus
    (`text_files`), concatenated and cut to `max_bytes`."""
    max_bytes = None if max_bytes is None else as_int("max_bytes", max_bytes, 1)
    files, where = text_files(path)
    data = _concat(files, max_bytes)
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
    block_size = as_int("block_size", block_size, 1)
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
