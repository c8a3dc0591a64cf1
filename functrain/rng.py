"""Randomness as a key, JAX style.

The state holds one key (a 63-bit int in a 0-d int64 tensor). Every random draw of a step
comes from a seed derived from (key, step, rank) with a real hash, so step k's randomness
depends on the key and k alone, never on what ran before it — which is what makes resume
exact. Nothing here touches the global RNG except inside `seeded`, which restores it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

_MASK63 = (1 << 63) - 1


def fold_in(*parts: int | str) -> int:
    """A 63-bit seed from a blake2b hash of the parts (never Python's salted `hash()`).

    >>> fold_in(0, 5, 1) == fold_in(0, 5, 1) != fold_in(0, 6, 1)
    True
    """
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def init_seed(seed: int) -> int:
    """The seed the CLI builds a recipe's model under (`with seeded(init_seed(seed)):`)."""
    return fold_in(seed, "init")


def data_seed(seed: int) -> int:
    """The seed the CLI shuffles a recipe's data with (`make_loader(..., seed=data_seed(seed))`)."""
    return fold_in(seed, "data")


def key(seed: int) -> torch.Tensor:
    """The state's RNG key for a recipe seed: a 0-d int64 CPU tensor."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.tensor(fold_in("functrain-key", seed), dtype=torch.int64)


def step_seed(rng: torch.Tensor, step: int, rank: int = 0) -> int:
    """The seed of one step's randomness on one rank."""
    return fold_in(int(rng), step, rank)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body with torch's RNG seeded from `seed`, then restore the global RNG.

    Models use `nn.Dropout` and friends unchanged: they draw from torch's RNG, which inside
    this block is a pure function of the seed. On CPU only the CPU generator is seeded:
    `torch.manual_seed` would also seed CUDA, XPU and MTIA lazily, which on a CPU-only
    build costs ~0.2 ms per call (a stack trace formatted per device), several percent of a
    small model's step, for the same dropout masks.
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield


def micro_seed(rng: torch.Tensor, step: int, micro_batch: int) -> int:
    """The seed of one micro-batch's randomness: (key, step, global micro-batch index), the
    same on any number of processes (`forward_backward(micro_batch_size=...)`)."""
    return fold_in(int(rng), step, "micro", micro_batch)
