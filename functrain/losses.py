"""Loss functions `loss(model, batch) -> scalar tensor`, the form the step calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Loss = Callable[[nn.Module, Any], torch.Tensor]


def cross_entropy() -> Loss:
    """Classification: batch `(x, y)`, `model(x)` gives logits `[B, C]`."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return loss


def next_token_cross_entropy() -> Loss:
    """Language modelling: batch `(x, y)` of token ids `[B, T]`, logits `[B, T, V]`."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return loss
