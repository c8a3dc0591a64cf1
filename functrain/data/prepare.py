"""`prepare`: text files -> the token files `token_file` reads (`functrain prepare`).

    prepare(["notes/", "book.txt"], "data/mine")   # or None: the default corpus

writes `train.bin` and `val.bin` (byte-level tokens as uint16: the vocabulary is the 256
byte values) and `meta.json` into a new directory, which `token_file(path=DIR)` reads as
its train and val splits. The text is streamed file by file, never held whole; the
validation split is the last `val_fraction` of the tokens. The directory is written under a
temporary name and renamed when complete, so a half-prepared one is never seen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import torch

from functrain.data.text import text_files
from functrain.errors import DataError

__all__ = ["prepare"]

_CHUNK = 16 << 20  # bytes of text (and of tokens to move) per write


def prepare(
    inputs: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Tokenize the text of `inputs` (files or folders; None or []: the default corpus)
    into the new directory `out`; return its `meta.json`. `progress(done, total)` is
    called with bytes of text as they are written."""
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DataError(f"{final} already exists; prepare writes a new directory: pick another")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    files = [f for source in (inputs or [None]) for f in text_files(source)[0]]
    total = sum(f.stat().st_size for f in files)
    total = total if max_bytes is None else min(total, max_bytes)
    if not total:
        raise DataError("the inputs hold no text (empty, or only hidden or binary files)")
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        n = _write_tokens(files, tmp / "train.bin", total, progress)
        n_val = round(n * val_fraction)
        if n_val:
            _move_tail(tmp / "train.bin", tmp / "val.bin", n_val)
        meta = {
            "format": "functrain-tokens",
            "tokenizer": "bytes",
            "vocab_size": 256,
            "dtype": "uint16",
            "tokens": {"train": n - n_val, "val": n_val},
            "files": len(files),
        }
        (tmp / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        if final.exists():  # an empty directory: take its place
            final.rmdir()
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_tokens(
    files: list[Path], path: Path, total: int, progress: Callable[[int, int], None] | None
) -> int:
    """Each byte of the files as one uint16 token, up to `total` bytes; the count written."""
    done = 0
    with open(path, "wb") as out:
        for f in files:
            if done >= total:
                break
            with open(f, "rb") as src:
                while done < total and (chunk := src.read(min(_CHUNK, total - done))):
                    tokens = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).to(torch.uint16)
                    out.write(memoryview(tokens.view(torch.uint8).numpy()))
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return done


def _move_tail(train: Path, val: Path, tokens: int) -> None:
    """Move the last `tokens` uint16 tokens of `train` into the new file `val`."""
    size = train.stat().st_size
    start = size - 2 * tokens
    with open(train, "r+b") as src, open(val, "wb") as dst:
        src.seek(start)
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(start)
        os.fsync(src.fileno())
