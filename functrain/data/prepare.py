"""`prepare`: text files -> the token files `token_file` reads (`functrain prepare`).

    prepare(["notes/", "book.txt"], "data/mine")   # or None: the default corpus

writes `train.bin` and `val.bin` and `meta.json` into a new directory, which
`token_file(path=DIR)` reads as its train and val splits. By default the tokens are bytes
(uint16, the 256 byte values: no dependency). With `tokenizer="tokenizer.json"` a Hugging
Face `tokenizers` tokenizer encodes the text (the optional extra `functrain[tokenizers]`),
a chunk of whole lines at a time, as uint16 when its vocabulary fits, else uint32; the
tokenizer file's sha256 goes into `meta.json`. The text is streamed file by file, never held
whole; the validation split is the last `val_fraction` of the tokens. The directory is
written under a temporary name and renamed when complete, so a half-prepared one is never
seen.
"""

from __future__ import annotations

import hashlib
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
    tokenizer: str | os.PathLike | None = None,
) -> dict:
    """Tokenize the text of `inputs` (files or folders; None or []: the default corpus)
    into the new directory `out`; return its `meta.json`. `progress(done, total)` is
    called with bytes of text as they are written. `tokenizer`: a `tokenizer.json`."""
    encode, about = _bytes() if tokenizer is None else _hf_tokenizer(Path(tokenizer))
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
        n = _write_tokens(files, tmp / "train.bin", total, progress, encode)
        n_val = round(n * val_fraction)
        if n_val:
            _move_tail(tmp / "train.bin", tmp / "val.bin", n_val, _ITEMSIZE[about["dtype"]])
        meta = {
            "format": "functrain-tokens",
            **about,
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


_ITEMSIZE = {"uint16": 2, "uint32": 4}
Encode = Callable[[bytes], torch.Tensor]  # text bytes -> token ids (uint16 or uint32)


def _bytes() -> tuple[Encode, dict]:
    def encode(chunk: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(chunk), dtype=torch.uint8).to(torch.uint16)

    return encode, {"tokenizer": "bytes", "vocab_size": 256, "dtype": "uint16"}


def _hf_tokenizer(path: Path) -> tuple[Encode, dict]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            "--tokenizer needs the `tokenizers` package, an optional extra: "
            "pip install 'functrain[tokenizers]'"
        ) from None
    if not path.is_file():
        raise DataError(f"tokenizer {str(path)!r} does not exist; give a tokenizer.json file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:
        raise DataError(
            f"tokenizer {str(path)!r} could not be read as a tokenizer.json: {err}"
        ) from err
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    torch_dtype = torch.uint16 if dtype == "uint16" else torch.uint32

    def encode(chunk: bytes) -> torch.Tensor:
        ids = tok.encode(chunk.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int64).to(torch_dtype)

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    about = {"tokenizer": f"tokenizers:{path.name}", "tokenizer_sha256": digest}
    return encode, {**about, "vocab_size": vocab, "dtype": dtype}


def _write_tokens(
    files: list[Path],
    path: Path,
    total: int,
    progress: Callable[[int, int], None] | None,
    encode: Encode,
) -> int:
    """The files' text encoded, up to `total` bytes of it; the count of tokens written.

    Text is read in chunks of whole lines (a line longer than a chunk is cut), so a
    tokenizer never sees a word split between two chunks.
    """
    done = written = 0
    with open(path, "wb") as out:
        for f in files:
            if done >= total:
                break
            with open(f, "rb") as src:
                while done < total and (chunk := src.read(min(_CHUNK, total - done))):
                    if done + len(chunk) < total:
                        chunk += src.readline(_CHUNK)  # end on a line boundary
                    chunk = chunk[: total - done]
                    tokens = encode(chunk)
                    out.write(memoryview(tokens.view(torch.uint8).numpy()))
                    done += len(chunk)
                    written += tokens.numel()
                    if progress is not None:
                        progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return written


def _move_tail(train: Path, val: Path, tokens: int, itemsize: int) -> None:
    """Move the last `tokens` tokens of `train` into the new file `val`."""
    size = train.stat().st_size
    start = size - itemsize * tokens
    with open(train, "r+b") as src, open(val, "wb") as dst:
        src.seek(start)
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(start)
        os.fsync(src.fileno())
