"""How a batch made in a worker process reaches the main process: small tensors by value.

A DataLoader worker hands each tensor of a batch over in shared memory: the worker makes
a shared-memory file, and the main process fetches its file descriptor from the worker over
a socket. On the 2-core machine this costs about 1 ms per tensor, whatever its size, which
is more than reading a batch of token windows takes (`bench/data.py`). A tensor under
`BY_VALUE_BYTES` is instead pickled as its bytes through the worker's result pipe and
rebuilt, with the same dtype, shape and bits, in the main process; bigger ones (images,
long sequences) keep shared memory, where copying would cost more than the handshake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate, get_worker_info

#: Tensors of at most this many bytes are sent by value from a worker (a copy through the
#: pipe); bigger ones go through shared memory.
BY_VALUE_BYTES = 1 << 20


def by_value(collate_fn: Callable[[list], Any] | None) -> Callable[[list], Any]:
    """`collate_fn` (default: torch's `default_collate`), with the small tensors of the
    batches it makes in a worker process sent by value. In the main process it is
    `collate_fn` itself."""
    collate = collate_fn or default_collate

    def collate_in_worker(samples: list) -> Any:
        batch = collate(samples)
        if get_worker_info() is None:
            return batch
        return tree_map(_pack, batch)

    return collate_in_worker


class _ByValue:
    """A tensor that pickles as its bytes and unpickles as a plain tensor again."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple:
        t = self.tensor.contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return _unpack, (raw, t.dtype, tuple(t.shape))


def _pack(leaf: Any) -> Any:
    plain = type(leaf) is torch.Tensor and leaf.device.type == "cpu"
    plain = plain and leaf.layout == torch.strided and not leaf.is_quantized
    small = plain and leaf.numel() * leaf.element_size() <= BY_VALUE_BYTES
    return _ByValue(leaf) if small and not leaf.requires_grad else leaf


def _unpack(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
