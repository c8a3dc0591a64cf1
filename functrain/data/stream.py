"""Data that is not map-style: sharded streaming sources, and plain iterables.

**Sources.** A `Source` knows how many records each of its shards holds and can open a
shard at a record offset (as MosaicML Streaming's index does):

    class MySource:
        def shard_sizes(self) -> list[int]: ...            # records per shard
        def open(self, shard: int, offset: int) -> Iterator: ...  # records from `offset` on
        def fingerprint(self) -> str: ...                  # optional: what identifies the data

`Stream(source, window=W)` reads it in an order that is a pure function of (seed, epoch):
each epoch permutes the shards (`functrain.data.order.Shuffle`, keyed by the seed and the
epoch) and reads them one after another; inside a shard, every run of W records (a
window) is read in one go and handed out in an order permuted by (seed, epoch, shard,
window). So the global cursor alone says where the stream stands: position p of epoch e
is one shard, one window, one record. A resume opens that shard at that window's start
and reads at most W records: O(W), not O(position), with workers and on any world size
(the cursor's slices of the global batch, as for map-style data). Each data-loader worker
reads the windows its batches touch, so with `num_workers: N` a window may be read by up
to N workers; memory is two windows per worker.

**Plain iterables.** A `torch.utils.data.IterableDataset` has no position to go back to.
`make_loader` reads it in the main process (every rank reads the whole stream and keeps
its slice of each global batch, so the sample order does not depend on the world size),
and refuses to start anywhere but at 0 — a resumed run would otherwise train on other
samples silently — unless `replay=True` (`data.replay: true`), which skips the first
`start` records one by one: time linear in the position, with a warning.

**Stateful iterables.** An IterableDataset with `state_dict()` and `load_state_dict(state)`
(torchdata's `Stateful` protocol; the state plain JSON data) is read the same way, and its
`state_dict()` at each snapshot is recorded in the manifest (`data_state`): resume loads
it back before the first batch, and `__iter__` must continue from the loaded state. How
exact that is depends on the dataset; with no recorded state, resume refuses as for a
plain iterable.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import orjson
from torch.utils.data import Dataset, IterableDataset

from functrain.data._args import as_int
from functrain.data.order import Shuffle
from functrain.errors import DataError
from functrain.rng import fold_in

__all__ = [
    "IterableSlices",
    "Source",
    "Stream",
    "check_start",
    "data_state",
    "is_plain_iterable",
    "is_stateful",
    "restore",
]


@runtime_checkable
class Source(Protocol):
    """Sharded records: sizes up front, and each shard readable from a record offset."""

    def shard_sizes(self) -> Sequence[int]: ...

    def open(self, shard: int, offset: int) -> Iterator[Any]: ...


class Stream(Dataset):
    """A `Source` as the data cursor reads it: shards permuted per epoch, records shuffled
    within windows of `window` records (module docstring). `len` is the total record count."""

    def __init__(self, source: Source, *, window: int = 1024) -> None:
        if not isinstance(source, Source):
            raise DataError(
                f"{type(source).__name__} is not a functrain.data.Source: it needs "
                "shard_sizes() -> list of record counts and open(shard, offset) -> iterator"
            )
        self.source = source
        self.window = as_int("window", window, 1)
        self.sizes = [
            as_int(f"shard_sizes()[{i}]", n, 0) for i, n in enumerate(source.shard_sizes())
        ]
        self.total = sum(self.sizes)
        if self.total == 0:
            raise DataError(f"{type(source).__name__} holds no records (shard_sizes() sums to 0)")

    def __len__(self) -> int:
        return self.total

    def window_length(self, shard: int, w: int) -> int:
        """Records in window `w` of `shard` (the last window of a shard may be short)."""
        return min(self.window, self.sizes[shard] - w * self.window)

    def fingerprint(self) -> str:
        own = getattr(self.source, "fingerprint", None)
        return f"stream:{self.sizes}:{self.window}:{own() if callable(own) else type(self.source).__name__}"

    def keyed(self, seed: int, shuffle: bool) -> _KeyedStream:
        """The stream in the order of `seed` (or in file order when not `shuffle`), indexed
        by the epoch-qualified positions `CursorSampler(epochs=True)` yields."""
        return _KeyedStream(self, seed, shuffle)


class _KeyedStream(Dataset):
    def __init__(self, stream: Stream, seed: int, shuffle: bool) -> None:
        self.stream, self.seed, self.shuffle = stream, seed, shuffle
        self._epoch: tuple[int, list[int], list[int]] | None = None  # (epoch, shards, starts)
        self._windows: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        self._order: tuple[tuple[int, int, int], list[int]] | None = None

    def __len__(self) -> int:
        return self.stream.total

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard, record offset in it) of `position` in `epoch`."""
        s = self.stream
        shards, starts = self._layout(epoch)
        k = bisect.bisect_right(starts, position) - 1
        shard, offset = shards[k], position - starts[k]
        w, j = divmod(offset, s.window)
        length = s.window_length(shard, w)
        if self.shuffle and length > 1:
            j = self._permutation(epoch, shard, w, length)[j]
        return shard, w * s.window + j

    def _permutation(self, epoch: int, shard: int, w: int, length: int) -> list[int]:
        """The order of window `w` of `shard` in `epoch` (the last one is kept)."""
        key = (epoch, shard, w)
        if self._order is None or self._order[0] != key:
            order = Shuffle(length, fold_in(self.seed, epoch, "window", shard, w))
            self._order = (key, order.range(0, length).tolist())
        return self._order[1]

    def _layout(self, epoch: int) -> tuple[list[int], list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.stream.sizes)
            shards = list(range(n))
            if self.shuffle and n > 1:
                shards = Shuffle(n, fold_in(self.seed, epoch, "shards")).range(0, n).tolist()
            sizes = [self.stream.sizes[i] for i in shards]
            self._epoch = (epoch, shards, [0, *itertools.accumulate(sizes)][:-1])
        return self._epoch[1], self._epoch[2]

    def __getitem__(self, index: int) -> Any:
        epoch, position = divmod(index, self.stream.total)
        shard, record = self.locate(epoch, position)
        w = record // self.stream.window
        return self._window(shard, w)[record - w * self.stream.window]

    def _window(self, shard: int, w: int) -> list[Any]:
        """The records of window `w` of `shard`, read in one go; the last two are kept."""
        key = (shard, w)
        if key not in self._windows:
            s = self.stream
            length = s.window_length(shard, w)
            records = list(itertools.islice(s.source.open(shard, w * s.window), length))
            if len(records) != length:
                raise DataError(
                    f"{type(s.source).__name__}.open({shard}, {w * s.window}) gave "
                    f"{len(records)} records where shard_sizes() promises {length}"
                )
            self._windows[key] = records
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[key]


def is_plain_iterable(dataset: Any) -> bool:
    """Whether `dataset` is an IterableDataset: read in order, with no position to resume."""
    return isinstance(dataset, IterableDataset)


def is_stateful(dataset: Any) -> bool:
    """Whether `dataset` is an IterableDataset that saves and loads its own position."""
    return is_plain_iterable(dataset) and all(
        callable(getattr(dataset, m, None)) for m in ("state_dict", "load_state_dict")
    )


def data_state(dataset: Any) -> Any:
    """A stateful iterable's `state_dict()`, checked to be plain JSON data (it goes into
    each snapshot's manifest)."""
    state = dataset.state_dict()
    try:
        orjson.dumps(state)
    except TypeError as err:
        raise DataError(
            f"data.dataset ({type(dataset).__name__}).state_dict() must return plain JSON "
            f"data (it goes into each snapshot's manifest): {err}"
        ) from err
    return state


def restore(dataset: Any, state: Any, start: int, *, replay: bool) -> bool:
    """Before resuming at `start`: load a stateful iterable's recorded `state` (or refuse,
    as `check_start` does, when there is none; with `replay` it is read from its first
    record again and the records before `start` skipped). Returns whether the dataset now
    stands at `start`: pass it on as `make_loader(..., restored=...)`."""
    if not is_stateful(dataset) or not start:
        return False
    if state is None:
        if replay:
            return False
        raise DataError(
            f"data.dataset ({type(dataset).__name__}) saves its state, but the snapshot "
            "recorded none (it was made before the dataset had state_dict), so it cannot be "
            "resumed at its position; set data.replay: true to read and skip the first "
            "samples again"
        )
    try:
        dataset.load_state_dict(state)
    except Exception as err:
        raise DataError(
            f"data.dataset ({type(dataset).__name__}).load_state_dict refused the snapshot's "
            f"data_state: {type(err).__name__}: {err}"
        ) from err
    return True


def check_start(
    dataset: Any, start: int, *, replay: bool, num_workers: int = 0, restored: bool = False
) -> None:
    """Refuse what a plain iterable cannot do exactly: start past 0 without `replay` (unless
    `restore` placed it there: `restored`), or be read by workers (each would read, and
    yield, the whole stream)."""
    if not is_plain_iterable(dataset):
        return
    name = type(dataset).__name__
    if num_workers:
        raise DataError(
            f"data.dataset ({name}) is a plain IterableDataset: it is read in the main "
            "process, so set data.num_workers: 0 (or make it a functrain.data.Source, which "
            "workers can read)"
        )
    if start and not replay and not restored:
        raise DataError(
            f"data.dataset ({name}) is a plain IterableDataset, which cannot be resumed at "
            f"sample {start}: it has no position to go back to, and starting it afresh would "
            "train on other samples than the run would have. Make it a functrain.data.Source "
            "(shard sizes and open(shard, offset): resumed exactly in O(1)), or set "
            "data.replay: true to read and skip the first samples again (exact for a "
            "deterministic iterable, time linear in the position)"
        )


class IterableSlices(IterableDataset):
    """This rank's slices of the global batches of an iterable, from `start` records on."""

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        batch_size: int,
        world_size: int,
        rank: int,
        start: int,
        restored: bool = False,
    ) -> None:
        """`restored`: `restore` placed the dataset at `start`; else its first `start`
        records are read and skipped (replay)."""
        self.dataset, self.batch_size = dataset, batch_size
        self.world_size, self.rank, self.start = world_size, rank, start
        self.skip = 0 if restored else start

    def __iter__(self) -> Iterator[Any]:
        g, b = self.batch_size * self.world_size, self.batch_size
        records = _forever(self.dataset)
        for _ in range(self.skip):  # replay: linear in the position
            next(records)
        while True:
            batch = list(itertools.islice(records, g))
            yield from batch[self.rank * b : (self.rank + 1) * b]


def _forever(dataset: IterableDataset) -> Iterator[Any]:
    """The dataset's records, pass after pass (each pass one epoch). One empty pass is
    allowed (a stateful dataset restored at the very end of a pass); two in a row are not."""
    empty = 0
    while True:
        empty += 1
        for record in dataset:
            empty = 0
            yield record
        if empty >= 2:
            raise DataError(f"{type(dataset).__name__} yielded no records")
