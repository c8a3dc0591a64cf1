"""Data fingerprints: what a run's sample order depends on, and the changes between two."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import IterableDataset, TensorDataset

from functrain.data.order import ORDER_VERSION
from functrain.hashing import tensor_bytes

_FINGERPRINT_SAMPLES = 256  # samples hashed for datasets with neither fingerprint() nor tensors


def _hash_value(h: Any, value: Any) -> None:
    """Feed one sample into a hash: tensors by dtype, shape and bytes; containers recursively."""
    if isinstance(value, torch.Tensor):
        h.update(f"tensor:{value.dtype}:{tuple(value.shape)}:".encode())
        h.update(tensor_bytes(value))
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
    elif isinstance(dataset, IterableDataset):  # never read here: it may be endless
        h.update(f"iterable:{type(dataset).__module__}.{type(dataset).__qualname__}".encode())
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
    """What a run's sample order depends on: size, content hash, global batch, shuffle, seed,
    and the version of the order itself (`functrain.data.order.ORDER_VERSION`).

    The content hash is sha256 of: the dataset's own `fingerprint()` string if it has one;
    else, for a TensorDataset, all its tensors' bytes; else up to 256 evenly spaced samples
    (tensors by dtype, shape and bytes, other values by `repr`) — so a change elsewhere in
    such a dataset, or a random `__getitem__`, is not caught or gives a varying hash. A
    plain `IterableDataset` is never read: its own `fingerprint()`, or its class name.
    """
    return {
        "size": None if isinstance(dataset, IterableDataset) else len(dataset),
        "content": _content_hash(dataset),
        "batch_size": batch_size,
        "shuffle": bool(shuffle),
        "seed": seed,
        "order": ORDER_VERSION,
    }


_CHANGED = {  # one sentence per fingerprint field, in this order
    "size": "dataset size {a} -> {b} samples",
    "content": "data content changed (sha256 {a!s:.6}… -> {b!s:.6}…): "
    "the dataset's files differ from the run's",
    "batch_size": "global batch size {a} -> {b}",
    "shuffle": "shuffle {a} -> {b}",
    "seed": "data shuffling seed {a} -> {b}",
    "order": "sample order version {a} -> {b}: this functrain computes each epoch's order "
    "with a keyed bijection (functrain.data.order); the snapshot was made with another "
    "order (version 1: torch.randperm, functrain < 0.3), so its next samples cannot be "
    "found. Finish that run with the functrain version that wrote it, or start a new run",
}
#: A fingerprint without an "order" field was made with the first order, torch.randperm.
_DEFAULTS = {"order": 1}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """One human sentence per field that differs between two fingerprints; [] when equal."""
    extra = sorted((set(old) | set(new)) - set(_CHANGED), key=str)
    return [
        _CHANGED.get(key, f"data {key} {{a!r}} -> {{b!r}}").format(
            a=old.get(key, _DEFAULTS.get(key, "(none)")),
            b=new.get(key, _DEFAULTS.get(key, "(none)")),
        )
        for key in (*_CHANGED, *extra)
        if old.get(key, _DEFAULTS.get(key)) != new.get(key, _DEFAULTS.get(key))
    ]
