"""Metrics beyond the loss, for eval: each a `Metric` that measures a batch as a (sum,
count) pair, so the value over every batch and every rank is the sum of sums over the sum of
counts — never a mean of means, which weights an uneven last batch or rank wrongly.

    metrics:
      - _component_: functrain.metrics.accuracy
      - _component_: functrain.metrics.perplexity
        shift: true

A recipe's `metrics:` list names components that return a `Metric` (or a plain function
`f(model, batch) -> (sum, count)`, named by its `__name__`). They run at eval, with the
model in eval mode and no running statistic changed, and are logged as `eval_<name>`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from functrain.losses import IGNORE_INDEX, fields, logits_of

__all__ = ["Metric", "accuracy", "as_metric", "finish", "measure", "perplexity"]

Measure = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def _same(mean: torch.Tensor) -> torch.Tensor:
    return mean


@attrs.frozen
class Metric:
    """`measure(model, batch) -> (sum, count)` of one batch; the metric's value is
    `finish(total sum / total count)` (e.g. `exp` for perplexity)."""

    name: str
    measure: Measure
    finish: Callable[[torch.Tensor], torch.Tensor] = _same


def as_metric(value: Metric | Measure) -> Metric:
    """`value` itself if it is a Metric; a plain `f(model, batch) -> (sum, count)` named
    by its `__name__`."""
    if isinstance(value, Metric):
        return value
    if not callable(value):
        raise TypeError(
            f"a metric is a functrain.metrics.Metric or a function f(model, batch) -> "
            f"(sum, count), got {type(value).__name__}"
        )
    return Metric(name=getattr(value, "__name__", type(value).__name__), measure=value)


def _tokens(
    model: nn.Module, batch: Any, input: str | None, target: str | None, shift: bool, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], targets [N]) of a batch, shifted for aligned labels."""
    x, y = fields(batch, input, target, what)
    logits = logits_of(model(x), what)
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


def accuracy(input: str | None = None, target: str | None = None, shift: bool = False) -> Metric:
    """The share of predictions (the argmax of the logits: of each sample, or of each token
    of a sequence) equal to the target; targets of -100 are not counted. `shift`: labels
    aligned with the inputs, as `transformers` takes them (`losses.next_token_cross_entropy`)."""

    def measure(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, y = _tokens(model, batch, input, target, shift, "accuracy")
        counted = y != IGNORE_INDEX
        right = (logits.argmax(-1) == y) & counted
        return right.sum().double(), counted.sum().double()

    return Metric(name="accuracy", measure=measure)


def perplexity(input: str | None = None, target: str | None = None, shift: bool = False) -> Metric:
    """exp of the mean next-token negative log-likelihood over every counted token (targets
    of -100 are not counted). `shift` as for `accuracy`."""

    def measure(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, y = _tokens(model, batch, input, target, shift, "perplexity")
        nll = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
        return nll.double(), (y != IGNORE_INDEX).sum().double()

    return Metric(name="perplexity", measure=measure, finish=torch.exp)


def measure(
    metrics: Sequence[Metric], model: nn.Module, batch: Any, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The (sum, count) of each metric on one batch, as a float64 tensor [len(metrics), 2] on
    `device` (a metric may give Python numbers or tensors on any device)."""
    pairs = [
        torch.stack([torch.as_tensor(v).to(device, torch.float64).reshape(()) for v in pair])
        for pair in (m.measure(model, batch) for m in metrics)
    ]
    return torch.stack(pairs)


def finish(metrics: Sequence[Metric], totals: torch.Tensor) -> dict[str, float]:
    """Each metric's value from its total (sum, count) over every batch and rank."""
    return {
        m.name: float(m.finish(totals[i, 0] / totals[i, 1])) if totals[i, 1] > 0 else float("nan")
        for i, m in enumerate(metrics)
    }
