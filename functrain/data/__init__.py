"""Data: a loader rebuilt from one int, fingerprints of the data, the default text corpus.

The state's data cursor is the number of *global* samples consumed since the start of
training. The order of samples is a pure function of (seed, epoch), and rank r of W takes
its slice of each global batch, so `make_loader(..., start=cursor)` yields exactly what an
uninterrupted run would have yielded next — in O(1), with any number of workers, under any
world size that divides the global batch.

>>> import torch
>>> ds = torch.utils.data.TensorDataset(torch.arange(10))
>>> [b[0].tolist() for b, _ in zip(make_loader(ds, batch_size=2, seed=0, shuffle=False, start=8), range(3))]
[[8, 9], [0, 1], [2, 3]]

    cursor.py        `CursorSampler`, `make_loader`
    fingerprints.py  `fingerprint`, `fingerprint_changes`
    text.py          `ByteBlocks`, `read_text`, `text_corpus` (the default corpus)
    tokens.py        `token_file`, `TokenWindows`: token files read through a memory map
    prepare.py       `prepare`: text files -> token files (`functrain prepare`)
    order.py         `Shuffle`: each epoch's order, a keyed bijection computed per position
    stream.py        `Source`, `Stream`: sharded streaming data; plain iterables
"""

from functrain.data.cursor import CursorSampler, make_loader
from functrain.data.fingerprints import fingerprint, fingerprint_changes
from functrain.data.prepare import prepare
from functrain.data.stream import (
    Source,
    Stream,
    check_start,
    data_state,
    is_plain_iterable,
    is_stateful,
    restore,
)
from functrain.data.text import ByteBlocks, read_text, text_corpus
from functrain.data.tokens import TokenWindows, token_file
from functrain.errors import DataError

__all__ = [
    "ByteBlocks",
    "CursorSampler",
    "check_start",
    "data_state",
    "DataError",
    "fingerprint",
    "fingerprint_changes",
    "make_loader",
    "prepare",
    "read_text",
    "restore",
    "is_plain_iterable",
    "is_stateful",
    "Source",
    "Stream",
    "text_corpus",
    "token_file",
    "TokenWindows",
]
