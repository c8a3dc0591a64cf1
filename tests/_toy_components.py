"""Tiny callables that recipe tests name as `_component_` targets (no functrain parts)."""

from __future__ import annotations

from typing import Literal, Optional

import attrs


@attrs.frozen
class Model:
    width: int
    depth: int = 2
    act: Optional[str] = None  # noqa: UP045 -- typing.Optional is what the checker must read
    attn: object = None


@attrs.frozen
class Attention:
    heads: int = 4


def loss(reduction: Literal["mean", "sum"] = "mean") -> tuple:
    return ("loss", reduction)


def dataset(size: int, block: int | None = None) -> dict:
    return {"train": list(range(size)), "block": block}


def optimizer(lr: float, weight_decay: float = 0.0, betas: tuple = (0.9, 0.999)) -> dict:
    return {"lr": lr, "weight_decay": weight_decay, "betas": betas}


def constant() -> str:
    return "constant"


def cosine(total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> tuple:
    return ("cosine", total_steps, warmup_steps, final)


def forward_backward(micro_batches: int = 1) -> tuple:
    return ("fb", micro_batches)


def clip(max_norm: float) -> tuple:
    return ("clip", max_norm)


def apply() -> str:
    return "apply"


def anything(**kwargs: object) -> dict:
    return kwargs


def needs_position(x: int, /) -> int:
    return x


def needs_extra(device: str, size: int = 1) -> tuple:
    return (device, size)


NOT_CALLABLE = 42
