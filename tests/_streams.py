"""Streaming data for the tests: a sharded Source and a plain IterableDataset, both of
deterministic token windows, nameable from a recipe (tests/ on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from functrain.data import Stream


def _window(i: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    t = torch.randint(0, 256, (block_size + 1,), generator=g)
    return t[:-1], t[1:]


class Records:
    """Shards of records 0..N-1 (sizes given); counts how many records were read."""

    def __init__(self, sizes: list[int], block_size: int = 0) -> None:
        self.sizes, self.block_size = list(sizes), block_size
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.read = 0

    def shard_sizes(self) -> list[int]:
        return self.sizes

    def open(self, shard: int, offset: int) -> Iterator:
        for j in range(offset, self.sizes[shard]):
            self.read += 1
            i = self.starts[shard] + j
            yield _window(i, self.block_size) if self.block_size else torch.tensor(i)

    def fingerprint(self) -> str:
        return f"records:{self.sizes}:{self.block_size}"


class Windows(IterableDataset):
    """A plain iterable (no state): `n` token windows in order."""

    def __init__(self, n: int, block_size: int) -> None:
        self.n, self.block_size = n, block_size

    def __iter__(self) -> Iterator:
        for i in range(self.n):
            yield _window(i, self.block_size)


class StatefulWindows(Windows):
    """An iterable that saves its position (torchdata's Stateful protocol)."""

    def __init__(self, n: int, block_size: int) -> None:
        super().__init__(n, block_size)
        self.position = 0

    def __iter__(self) -> Iterator:
        while self.position < self.n:
            i = self.position
            self.position += 1
            yield _window(i, self.block_size)
        self.position = 0  # the pass is over: the next one starts afresh

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def stateful_tokens(block_size: int, n: int = 400) -> dict:
    return {"train": StatefulWindows(n, block_size)}


def sharded_tokens(block_size: int, sizes: list[int], window: int = 16) -> dict:
    return {"train": Stream(Records(sizes, block_size), window=window)}


def iterable_tokens(block_size: int, n: int = 400) -> dict:
    return {"train": Windows(n, block_size)}
