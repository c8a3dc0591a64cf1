"""Loss functions `loss(model, batch) -> scalar tensor`, the form the step calls.

Each takes the batch in the common shapes: a pair `(x, y)` (a `TensorDataset`'s, a token
file's), or a mapping with named fields (what Hugging Face datasets and most `__getitem__`s
return) — the input under `input` and the target under `target` when the recipe names them,
else the first present of `input_ids`, `x`, `inputs`, `input` and of `labels`, `y`,
`targets`, `target`. Any other batch is refused with its structure named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Loss = Callable[[nn.Module, Any], torch.Tensor]

INPUT_KEYS = ("input_ids", "x", "inputs", "input")
TARGET_KEYS = ("labels", "y", "targets", "target")


def cross_entropy(input: str | None = None, target: str | None = None) -> Loss:
    """Classification: `model(x)` gives logits `[B, C]` for targets `y` `[B]`.
    `input`, `target`: the field names of a mapping batch (module docstring)."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = fields(batch, input, target, "cross_entropy")
        return F.cross_entropy(model(x), y)

    return loss


def next_token_cross_entropy(input: str | None = None, target: str | None = None) -> Loss:
    """Language modelling: token ids `x` and `y` `[B, T]`, `model(x)` gives logits
    `[B, T, V]`. `input`, `target`: the field names of a mapping batch."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = fields(batch, input, target, "next_token_cross_entropy")
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return loss


def fields(batch: Any, input: str | None, target: str | None, loss: str) -> tuple[Any, Any]:
    """`(input, target)` of a batch `(x, y)` or of a mapping with named fields."""
    if isinstance(batch, Mapping):
        x_key = input if input is not None else _first(batch, INPUT_KEYS)
        y_key = target if target is not None else _first(batch, TARGET_KEYS)
        if x_key in batch and y_key in batch:
            return batch[x_key], batch[y_key]
        missing, key, keys = (
            ("input", x_key, INPUT_KEYS) if x_key not in batch else ("target", y_key, TARGET_KEYS)
        )
        raise TypeError(
            f"{loss}: the batch is {structure(batch)}, with no {missing} field "
            f"({key if key is not None else ' / '.join(keys)}); name its fields: loss: "
            f"{{_component_: functrain.losses.{loss}, input: KEY, target: KEY}}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"{loss} takes a batch (x, y) or a mapping with input and target fields; the batch "
        f"is {structure(batch)}"
    )


def _first(batch: Mapping, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in batch), None)


def structure(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure: `dict {x: Tensor[8, 16] int64, ...}`."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{list(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if depth > 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k}: {structure(v, depth + 1)}" for k, v in list(batch.items())[:6])
        return f"{type(batch).__name__} {{{inner}}}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(structure(v, depth + 1) for v in batch[:6])
        return f"{type(batch).__name__} of {len(batch)} ({inner})"
    return type(batch).__name__
