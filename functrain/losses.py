"""Loss functions `loss(model, batch) -> scalar tensor`, the form the step calls.

Each takes the batch in the common shapes: a pair `(x, y)` (a `TensorDataset`'s, a token
file's), or a mapping with named fields (what Hugging Face datasets and most `__getitem__`s
return) — the input under `input` and the target under `target` when the recipe names them,
else the first present of `input_ids`, `x`, `inputs`, `input` and of `labels`, `y`,
`targets`, `target`. Any other batch is refused with its structure named. The model may
return logits, or an output holding them (`.logits`, `["logits"]`, or a tuple's first item:
a `transformers` model's `ModelOutput`). A target of -100 is ignored, as in torch's
`cross_entropy`.

`model_loss` is for a model that computes its own loss (`transformers`, timm's wrappers):
it calls `model(**batch)` and takes the output's loss.
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


#: The target value the losses skip (torch's `cross_entropy` default, `transformers`' too).
IGNORE_INDEX = -100


def cross_entropy(input: str | None = None, target: str | None = None) -> Loss:
    """Classification: `model(x)` gives logits `[B, C]` for targets `y` `[B]`.
    `input`, `target`: the field names of a mapping batch (module docstring)."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = fields(batch, input, target, "cross_entropy")
        return F.cross_entropy(logits_of(model(x), "cross_entropy"), y, ignore_index=IGNORE_INDEX)

    return loss


def next_token_cross_entropy(
    input: str | None = None, target: str | None = None, shift: bool = False
) -> Loss:
    """Language modelling: token ids `x` and targets `y` `[B, T]`, `model(x)` gives logits
    `[B, T, V]`. `input`, `target`: the field names of a mapping batch.

    `shift: false` (the default): `y` is already the next token of each position (functrain's
    datasets give `y = x` moved by one). `shift: true`: `y` is aligned with `x`, as
    `transformers` takes `labels == input_ids`, and the loss predicts `y[:, 1:]` from the
    logits at `[:, :-1]`. Targets of -100 are ignored either way."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = fields(batch, input, target, "next_token_cross_entropy")
        logits = logits_of(model(x), "next_token_cross_entropy")
        if shift:
            logits, y = logits[:, :-1], y[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX
        )

    return loss


def model_loss() -> Loss:
    """The model computes its own loss: `model(**batch)` for a mapping batch, `model(*batch)`
    for a tuple or list, `model(batch)` otherwise; the loss is the output's `.loss`, its
    `["loss"]`, or its first item (a tuple's). A `transformers` model returns one when the
    batch holds `labels`."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            out = model(**batch)
        elif isinstance(batch, (tuple, list)):
            out = model(*batch)
        else:
            out = model(batch)
        found = _loss_of(out)
        if found is None:
            raise TypeError(
                f"model_loss: the model returned {structure(out)}, which holds no loss (no "
                "`.loss`, no ['loss'], no tensor first); a transformers model computes one "
                "only when the batch holds `labels`. For logits, use "
                "functrain.losses.next_token_cross_entropy or cross_entropy instead"
            )
        return found

    return loss


def _part(out: Any, name: str) -> Any:
    """`name` of a model's output: the output itself if it is a tensor, else its attribute
    (`ModelOutput.loss`), its item (`{"loss": ...}`), or a tuple's first item; or None."""
    if isinstance(out, torch.Tensor):
        return out
    found = getattr(out, name, None)
    if found is None and isinstance(out, Mapping):
        found = out.get(name)
    if found is None and isinstance(out, (tuple, list)) and out:
        found = out[0]
    return found


def _loss_of(out: Any) -> torch.Tensor | None:
    found = _part(out, "loss")
    is_scalar = isinstance(found, torch.Tensor) and found.dim() == 0
    return found if is_scalar else None


def logits_of(out: Any, loss: str) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, `.logits`, `["logits"]`, or a
    tuple's first item."""
    found = _part(out, "logits")
    if not isinstance(found, torch.Tensor):
        raise TypeError(
            f"{loss}: the model returned {structure(out)}, with no logits (a tensor, "
            "`.logits`, ['logits'] or a tuple's first item); for a model that computes its "
            "own loss use functrain.losses.model_loss"
        )
    return found


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
