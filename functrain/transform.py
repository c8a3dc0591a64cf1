"""Transforms: the named pieces a step is composed of, each an `(init, apply)` pair.

`apply(state, batch) -> state` does the work of one step; `init(state) -> state` sets up,
once at step 0, the entries the transform keeps (EMA its average). This is optax's
`GradientTransformation`, and `compose` is its `chain`: the composition of transforms is
again a transform. A plain function `f(state, batch) -> state` is a transform too: it is
wrapped with its `__name__` and an `init` that changes nothing.

>>> double = compose(lambda s, b: s, Transform(name="noop", apply=lambda s, b: s))
>>> double.name
'compose'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from functrain.state import TrainState

__all__ = ["Transform", "as_transform", "compose", "insert_after"]


def _unchanged(state: TrainState) -> TrainState:
    return state


@attrs.frozen
class Transform:
    """A named step transform: `apply(state, batch) -> state`, `init(state) -> state`."""

    name: str
    apply: Callable[[TrainState, Any], TrainState]
    init: Callable[[TrainState], TrainState] = _unchanged

    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        return self.apply(state, batch)


def as_transform(value: Transform | Callable[[TrainState, Any], TrainState]) -> Transform:
    """`value` itself if it is a Transform; a plain `f(state, batch)` wrapped as one."""
    if isinstance(value, Transform):
        return value
    if not callable(value):
        raise TypeError(
            f"a transform is a functrain.Transform or a function f(state, batch) -> state, "
            f"got {type(value).__name__}"
        )
    if hasattr(value, "init_state"):  # how EMA set up its state before transforms had init
        raise TypeError(
            f"transform {getattr(value, '__name__', value)!r} has an init_state attribute, "
            "which nothing calls any more: use Transform(name=..., apply=f, init=init_state)"
        )
    return Transform(name=getattr(value, "__name__", type(value).__name__), apply=value)


def compose(*transforms: Transform | Callable[[TrainState, Any], TrainState]) -> Transform:
    """One transform applying `transforms` in order (a fold), their inits in order too."""
    parts = tuple(as_transform(t) for t in transforms)

    def init(state: TrainState) -> TrainState:
        for part in parts:
            state = part.init(state)
        return state

    def apply(state: TrainState, batch: Any) -> TrainState:
        for part in parts:
            state = part.apply(state, batch)
        return state

    return Transform(name="compose", apply=apply, init=init)


def insert_after(
    transforms: Sequence[Transform | Callable], name: str, new: Sequence[Transform]
) -> list[Transform]:
    """`transforms` with `new` placed right after the first transform called `name`."""
    parts = [as_transform(t) for t in transforms]
    for i, part in enumerate(parts):
        if part.name == name:
            return [*parts[: i + 1], *new, *parts[i + 1 :]]
    names = ", ".join(p.name for p in parts) or "none"
    raise ValueError(f"no transform named {name!r} to insert after (the step has: {names})")
