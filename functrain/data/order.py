"""Each epoch's sample order as a keyed bijection of `[0, n)`, computed per position.

`Shuffle(n, key)` maps a position to a sample index in O(1) time and memory for any `n`
(10^10 and beyond): a Feistel network over the smallest even number of bits covering `n`,
whose round function is a 32-bit integer hash keyed per round, made a bijection of exactly
`[0, n)` by cycle-walking (an index that lands past `n` goes through the network again;
the network's domain is under 4n, so that takes fewer than 4 passes on average). A
Feistel network is a bijection whatever its round function, so the order is a permutation
by construction; tests check it exhaustively for small `n` and by sampling for 10^10.

All arithmetic is int64 tensor ops that never overflow (a 32-bit product is taken in
16-bit halves), so the order is the same on every platform, and vectorised: a batch of
positions costs a few dozen small tensor ops.

`ORDER_VERSION` names this order in data fingerprints. Version 1 (functrain < 0.3) drew
each epoch from `torch.randperm`, 8 bytes per sample; a snapshot made with it cannot be
continued with this order, and resume says so.
"""

from __future__ import annotations

import torch

from functrain.rng import fold_in

__all__ = ["ORDER_VERSION", "Shuffle"]

ORDER_VERSION = 2
_ROUNDS = 6
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_MUL = (0x7FEB352D, 0x846CA68B)  # the "lowbias32" integer hash's multipliers


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`x * c mod 2**32` for `x` and `c` below 2**32, with no int64 overflow."""
    lo, hi = x & _M16, x >> 16
    return (lo * c + (((hi * c) & _M16) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL[1])
    return x ^ (x >> 16)


class Shuffle:
    """A keyed pseudo-random bijection of `[0, n)`; call it on an int64 tensor of positions."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > 2**62:
            raise ValueError(f"n must be <= 2**62, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2  # each side of the network: half the bits, rounded up
        self._mask = (1 << self._half) - 1
        self._keys = [fold_in(key, "feistel", r) & _M32 for r in range(_ROUNDS)]

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_hash32(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The sample index at each of `positions` (int64, each in `[0, n)`)."""
        out = self._network(positions.to(torch.int64))
        over = out >= self.n
        while bool(over.any()):  # cycle-walk the few that land past n
            out[over] = self._network(out[over])
            over = out >= self.n
        return out

    def range(self, lo: int, hi: int) -> torch.Tensor:
        """The sample indices at positions `lo .. hi - 1`."""
        return self(torch.arange(lo, hi, dtype=torch.int64))
