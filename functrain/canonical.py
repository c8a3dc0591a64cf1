"""Canonical micro-batches: gradients whose bits do not depend on the number of processes.

With `forward_backward(micro_batch_size=M)` the global batch of G samples is cut into
V = G / M micro-batches in global sample order, and rank r of N computes its contiguous
share of V / N of them. Each micro-batch's loss and gradient depend only on its samples,
the params and (for dropout) a seed of (key, step, global micro-batch index). What remains
is to add the V gradients in one order that N does not change. That order is one tree:

- V = 2^a * c with c odd. The V micro-batches form 2^a *units* of c consecutive ones,
  added left to right; the units are the leaves of a perfect binary tree, each node the sum
  of its two children.
- With N = 2^b processes (b <= a) rank r's share is the subtree of units
  [r * 2^(a-b), (r + 1) * 2^(a-b)): it sums that subtree itself, as its micro-batches
  finish, with a stack (`TreeSum`: at most a - b + 1 partial sums held).
- The ranks then add their subtree sums in the same tree, siblings first
  (`functrain.distributed.reduce.tree_reduce_grads`: an all-to-all, each rank adding its
  slice of every rank's sums in the tree, then an all-gather). IEEE
  addition is commutative, so both partners of a pair get the same bits.

So every N that is a power of two dividing V gives the same bits as one process; other N
are refused before any step (`check_fit`).
"""

from __future__ import annotations

import torch

from functrain.errors import ConfigError

__all__ = ["TreeSum", "check_fit", "fits", "odd_part"]


def odd_part(v: int) -> int:
    """c of v = 2^a * c, c odd."""
    return v // (v & -v)


def fits(world_size: int, global_batch: int, micro_batch_size: int) -> bool:
    """Whether `world_size` processes can sum the canonical tree of this batch's micro-batches."""
    if global_batch % micro_batch_size or global_batch % world_size:
        return False
    v = global_batch // micro_batch_size
    power_of_two = world_size & (world_size - 1) == 0
    return power_of_two and v % world_size == 0


def check_fit(world_size: int, global_batch: int, micro_batch_size: int) -> None:
    """Raise ValueError, naming the sizes and the process counts that fit, unless `fits`."""
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if global_batch % micro_batch_size:
        raise ConfigError(
            f"the global batch of {global_batch} samples does not split into micro-batches of "
            f"micro_batch_size={micro_batch_size}; make the batch size a multiple of it"
        )
    if fits(world_size, global_batch, micro_batch_size):
        return
    v = global_batch // micro_batch_size
    counts = [2**k for k in range(v.bit_length()) if v % 2**k == 0]
    raise ConfigError(
        f"{world_size} processes cannot share the {v} micro-batches (global batch "
        f"{global_batch} / micro_batch_size {micro_batch_size}) in the canonical order: the "
        f"number of processes must be a power of two dividing {v}, i.e. one of "
        f"{', '.join(map(str, counts))}. Run on one of those, or change the batch size or "
        "micro_batch_size (a new run: they change what is trained)"
    )


class TreeSum:
    """The canonical sum of a rank's consecutive micro-batch gradients, as they come.

    `push` a list of tensors per micro-batch (gradients, then the loss); every `width` of
    them (c, the odd part of the count) are added left to right into a unit, and units are
    merged pairwise as soon as two of the same height are on the stack, so a subtree of
    2^k units holds at most k + 1 partial sums at once. The pushed lists are summed into in
    place: the first list of each unit becomes its sum.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._unit: list[torch.Tensor] | None = None
        self._in_unit = 0
        self._stack: list[tuple[int, list[torch.Tensor]]] = []  # (height, partial sum)
        self.peak = 0  # most partial sums held at once, the current unit included

    def push(self, tensors: list[torch.Tensor]) -> None:
        if self._unit is None:
            self._unit = tensors
        else:
            torch._foreach_add_(self._unit, tensors)
        self._in_unit += 1
        self.peak = max(self.peak, len(self._stack) + 1)
        if self._in_unit < self.width:
            return
        node, height = self._unit, 0
        self._unit, self._in_unit = None, 0
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            torch._foreach_add_(left, node)  # left + right: the same bits as right + left
            node, height = left, height + 1
        self._stack.append((height, node))

    def closes(self) -> bool:
        """Whether the next push completes the sum (its count reaches width * 2^k)."""
        heights = [h for h, _ in reversed(self._stack)]  # from the top: 0, 1, 2, ... merge
        return self._in_unit + 1 == self.width and heights == list(range(len(heights)))

    def close(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        """Leaf `i` of the push that completes the sum (`closes()`), added to the partial
        sums exactly as `push` adds it: a caller can finish each leaf as it comes (and start
        reducing it), then hand the finished leaves to `closed`."""
        node = tensor if self._unit is None else self._unit[i].add_(tensor)
        for _, left in reversed(self._stack):  # left + right, from the top of the stack
            node = left[i].add_(node)
        return node

    def closed(self, tensors: list[torch.Tensor]) -> None:
        """End the sum with `tensors`, every leaf finished by `close` (or what became of
        them: reduced over ranks); `result()` returns them."""
        self._unit, self._in_unit, self._stack = None, 0, [(len(self._stack), tensors)]

    def result(self) -> list[torch.Tensor]:
        """The sum of everything pushed; the count must have been width * 2^k."""
        if self._unit is not None or len(self._stack) != 1:
            raise ValueError(  # an internal invariant, not a user's value: keeps its traceback
                f"TreeSum got a count of micro-batches that is not {self.width} * 2^k "
                "(an incomplete subtree)"
            )
        return self._stack[0][1]
