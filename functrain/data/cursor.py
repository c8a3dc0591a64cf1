"""The data cursor: `CursorSampler`, positioned by global samples consumed, and `make_loader`.

See `functrain.data` for what the cursor means and why resuming from it is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from functrain.data._args import as_int
from functrain.data.order import Shuffle
from functrain.data.ship import by_value
from functrain.data.stream import (
    IterableSlices,
    Stream,
    check_start,
    is_plain_iterable,
)
from functrain.errors import DataError, warn
from functrain.rng import fold_in

#: Positions of an epoch's order computed at a time (32 KiB of int64), then handed out.
_CHUNK = 4096


class _CursorIter(Iterator[int]):
    """One pass of a CursorSampler from its start; counts what it handed out."""

    def __init__(self, sampler: CursorSampler, start: int) -> None:
        self._s = sampler
        self.start = start
        self.yielded = 0  # indices of this rank handed out
        self._chunk_id: tuple[int, int] = (-1, -1)  # (epoch, chunk) of `_chunk`
        self._chunk: list[int] = []
        self._batch: list[int] = []

    def position(self) -> int:
        """Global samples consumed: whole per-rank batches handed out, times G."""
        return self.start + (self.yielded // self._s.batch_size) * self._s.global_batch

    def __next__(self) -> int:
        s, j = self._s, self.yielded % self._s.batch_size
        if j == 0:  # a new batch: this rank's slice of the global batch at position()
            epoch, offset = divmod(self.position(), s.epoch_len)
            lo = offset + s.rank * s.batch_size
            self._batch = self._indices(epoch, lo, lo + s.batch_size)
        self.yielded += 1  # before returning, so position() counts a batch once it is taken
        return self._batch[j]

    def _indices(self, epoch: int, lo: int, hi: int) -> list[int]:
        """The sample indices at positions `lo .. hi - 1` of `epoch`, chunk by chunk."""
        out: list[int] = []
        while lo < hi:
            c = lo // _CHUNK
            if self._chunk_id != (epoch, c):
                end = min((c + 1) * _CHUNK, self._s.size)
                chunk = self._s.order(epoch, c * _CHUNK, end)
                if self._s.epochs:
                    chunk = [epoch * self._s.size + i for i in chunk]
                self._chunk_id, self._chunk = (epoch, c), chunk
            take = min(hi, (c + 1) * _CHUNK) - lo
            out += self._chunk[lo - c * _CHUNK : lo - c * _CHUNK + take]
            lo += take
        return out


class CursorSampler(Sampler[int]):
    """Infinite stream of this rank's sample indices, positioned by global samples consumed.

    `batch_size` is the per-rank batch B; G = B * world_size. An epoch is the first
    `(size // G) * G` positions of a permutation of `range(size)` keyed by
    `fold_in(seed, epoch)` (`functrain.data.order.Shuffle`, computed per position: O(1)
    memory for any size; identity when `shuffle=False`); global batch s is positions
    `[s*G, (s+1)*G)` and rank r takes `[s*G + r*B, s*G + (r+1)*B)`. `start` (a multiple of
    G) is where the stream begins; nothing before it is computed. With `epochs=True` it
    yields `epoch * size + index`, for datasets whose order depends on the epoch (`Stream`).
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
        epochs: bool = False,
    ) -> None:
        self.size = as_int("size", size, 0)
        self.epochs = bool(epochs)  # yield epoch * size + index (for `Stream`s)
        self.batch_size = as_int("batch_size", batch_size, 1)
        self.world_size = as_int("world_size", world_size, 1)
        self.rank = as_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise DataError(f"rank must be < world_size ({self.world_size}), got {self.rank}")
        self.seed = as_int("seed", seed, 0)
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
        self._shuffle: tuple[int, Shuffle] | None = None  # the epoch's order, keyed

    def _check_start(self, start: Any) -> int:
        start = as_int("start", start, 0)
        if start % self.global_batch:
            raise DataError(
                f"start must be a multiple of the global batch size {self.global_batch} "
                f"(global samples consumed at a step boundary), got {start}"
            )
        return start

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole order of `range(size)` in `epoch` (identity when not shuffling), int64:
        for inspection and tests; the sampler itself computes only the positions it hands out."""
        return torch.tensor(self.order(epoch, 0, self.size), dtype=torch.int64)

    def order(self, epoch: int, lo: int, hi: int) -> list[int]:
        """The sample indices at positions `lo .. hi - 1` of `epoch`'s order."""
        if not self.shuffle:
            return list(range(lo, hi))
        if self._shuffle is None or self._shuffle[0] != epoch:
            self._shuffle = (epoch, Shuffle(self.size, fold_in(self.seed, epoch)))
        return self._shuffle[1].range(lo, hi).tolist()

    def batch_indices(self, position: int) -> list[int]:
        """This rank's sample indices in the global batch at `position` (global samples
        consumed before it), as the sampler hands them out."""
        epoch, offset = divmod(position, self.epoch_len)
        lo = offset + self.rank * self.batch_size
        indices = self.order(epoch, lo, lo + self.batch_size)
        return [epoch * self.size + i for i in indices] if self.epochs else indices

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
    replay: bool = False,
    restored: bool = False,
) -> StatefulDataLoader:
    """A StatefulDataLoader yielding this rank's batches forever, from `start` global samples.

    `batch_size` is per rank. The global torch RNG is never drawn from: the loader's own
    generator (which seeds the workers) is derived from (seed, rank). A `Stream` is read in
    its own order of (seed, epoch); a plain `IterableDataset` in its own order, from 0 (or,
    with `replay`, by skipping `start` records, unless `restored`: `restore` placed it at
    `start` already; `functrain.data.stream`).
    """
    num_workers = as_int("num_workers", num_workers, 0)
    kwargs = dict(collate_fn=collate_fn, pin_memory=pin_memory)
    if is_plain_iterable(dataset):
        check_start(dataset, start, replay=replay, num_workers=num_workers, restored=restored)
        if start and not restored:
            warn(
                f"data.replay: reading and skipping the first {start} records of "
                f"{type(dataset).__name__} to resume (time linear in the position)"
            )
        per_rank = IterableSlices(
            dataset,
            batch_size=batch_size,
            world_size=world_size,
            rank=rank,
            start=start,
            restored=restored,
        )
        return _loader(per_rank, batch_size=batch_size, **kwargs)
    epochs = isinstance(dataset, Stream)
    if epochs:
        dataset = dataset.keyed(seed, shuffle)  # the stream shuffles itself, per epoch
    sampler = CursorSampler(
        len(dataset),
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle=shuffle and not epochs,
        start=start,
        epochs=epochs,
    )
    generator = torch.Generator().manual_seed(fold_in(seed, "loader", rank))
    if num_workers:  # small tensors come back by value, not in shared memory (data.ship)
        kwargs["collate_fn"] = by_value(collate_fn)
    return _loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        **kwargs,
    )


def _loader(dataset, **kwargs) -> StatefulDataLoader:
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in newer torch, on every construction.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, **kwargs)
