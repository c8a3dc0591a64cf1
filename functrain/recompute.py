"""Activation checkpointing: the blocks of a model recompute their activations in backward
instead of keeping them from the forward pass — less memory for about one more forward.

The blocks are the children of the model's `nn.ModuleList`s that hold params (a GPT's
transformer blocks), the same units FSDP2 shards. Each block's forward goes through
`torch.utils.checkpoint` (non-reentrant, `preserve_rng_state=True`): the recomputation
replays the CPU (and CUDA) RNG state the forward saw, so dropout draws the same masks and
the gradients are bitwise those of the model without checkpointing (tested). The module
tree, its param names and so the state's keys stay as they are.

>>> model = checkpoint_blocks(GPT(n_layer=2))        # doctest: +SKIP
"""

from __future__ import annotations

import types
from typing import Any

import torch.utils.checkpoint
from torch import nn

__all__ = ["blocks", "checkpoint_blocks", "is_checkpointed"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The children of `model`'s `nn.ModuleList`s that hold params, outermost first."""
    return [
        child
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        for child in m
        if any(True for _ in child.parameters())
    ]


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Make every block of `model` recompute its activations in backward (in place).

    Raises ValueError when the model has no such blocks: there would be nothing to save.
    """
    found = blocks(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no blocks to checkpoint: activation checkpointing "
            "recomputes the children of the model's nn.ModuleLists, and it has none with params"
        )
    for block in found:
        if not is_checkpointed(block):
            # An instance attribute shadows the class's forward; a bound method (unlike a
            # closure) is rebound to the copy when the model is deep-copied.
            block.forward = types.MethodType(_recomputed_forward, block)
    return model


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block.__dict__.get("forward"), "__func__", None) is _recomputed_forward


def _recomputed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(
        type(self).forward, self, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
    )
