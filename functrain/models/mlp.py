"""A small classifier with dropout and batch norm: the model of the tests and benchmarks."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """`in_features -> hidden x depth -> classes`, with BatchNorm, GELU and dropout."""

    replays_on_meta = True  # built on meta under torchrun, as `GPT` is

    def __init__(
        self,
        in_features: int = 16,
        hidden: int = 64,
        classes: int = 4,
        depth: int = 2,
        dropout: float = 0.1,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [
                nn.Linear(width, hidden),
                nn.BatchNorm1d(hidden),
                nn.GELU(),
                nn.Dropout(dropout),
            ]
            width = hidden
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)
