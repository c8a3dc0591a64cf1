"""Transforms: the named pieces a step is composed of, each an `(init, apply)` pair.

`apply(state, batch) -> state` does the work of one step; `init(state) -> state` sets up,
once at step 0, the entries the transform keeps (EMA its average). This is optax's
`GradientTransformation`, and `compose` is its `chain`: the composition of transforms is
again a transform. A plain function `f(state, batch) -> state` is a transform too: it is
wrapped with its `__name__` and an `init` that changes nothing.

A transform also says what it is, as data: whether it leaves gradients in `state.grads`
(`produces_grads`: under several processes the gradient reduction goes right after it) and
whether those are canonical (`micro_batch_size`: summed in the one tree that gives the same
bits on any world size, so the reduction must be the canonical one). The builder reads these
declarations, never a transform's name. To change what a transform does but keep what it
declares, `wrap` it:

>>> from functrain.steps import forward_backward
>>> fb = forward_backward(micro_batch_size=4)
>>> logged = fb.wrap(lambda inner, state, batch: inner(state, batch))
>>> logged.produces_grads, logged.micro_batch_size
(True, 4)

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

__all__ = ["Transform", "as_transform", "compose", "gradient_source", "insert_after_gradients"]


def _unchanged(state: TrainState) -> TrainState:
    return state


@attrs.frozen
class Transform:
    """A named step transform: `apply(state, batch) -> state`, `init(state) -> state`."""

    name: str
    apply: Callable[[TrainState, Any], TrainState]
    init: Callable[[TrainState], TrainState] = _unchanged
    #: It leaves this step's gradients in `state.grads` (and the loss in `state.metrics`);
    #: under several processes the gradient reduction is placed right after it.
    produces_grads: bool = attrs.field(default=False, kw_only=True)
    #: Its gradients are canonical micro-batches of this many samples of the global batch,
    #: summed in `functrain.canonical`'s tree: the ranks' sums must be added in that tree too.
    #: None: gradients that any reduction may average.
    micro_batch_size: int | None = attrs.field(default=None, kw_only=True)

    def __call__(self, state: TrainState, batch: Any) -> TrainState:
        return self.apply(state, batch)

    def wrap(
        self,
        around: Callable[[Callable[[TrainState, Any], TrainState], TrainState, Any], TrainState],
    ) -> Transform:
        """This transform with `apply` replaced by `around(inner_apply, state, batch)`; the
        name, init and declarations stay, so a wrapped `forward_backward` keeps its place
        and its canonical reduction."""
        inner = self.apply
        return attrs.evolve(self, apply=lambda state, batch: around(inner, state, batch))


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
    """One transform applying `transforms` in order (a fold), their inits in order too; it
    declares what its gradient source (if any) declares."""
    parts = tuple(as_transform(t) for t in transforms)
    source = gradient_source(parts)

    def init(state: TrainState) -> TrainState:
        for part in parts:
            state = part.init(state)
        return state

    def apply(state: TrainState, batch: Any) -> TrainState:
        for part in parts:
            state = part.apply(state, batch)
        return state

    return Transform(
        name="compose",
        apply=apply,
        init=init,
        produces_grads=source is not None,
        micro_batch_size=None if source is None else parts[source].micro_batch_size,
    )


def gradient_source(transforms: Sequence[Transform]) -> int | None:
    """The index of the one transform that declares `produces_grads`, or None; two are
    refused (ValueError naming them): a step computes its gradients once."""
    found = [i for i, t in enumerate(transforms) if t.produces_grads]
    if len(found) > 1:
        names = ", ".join(f"{transforms[i].name} (#{i})" for i in found)
        raise ValueError(f"more than one transform produces gradients: {names}")
    return found[0] if found else None


def insert_after_gradients(
    transforms: Sequence[Transform], new: Sequence[Transform]
) -> list[Transform]:
    """`transforms` with `new` (a gradient reduction) right after the one that declares
    `produces_grads`; ValueError when none does."""
    parts = list(transforms)
    i = gradient_source(parts)
    if i is None:
        names = ", ".join(p.name for p in parts) or "none"
        raise ValueError(f"no transform declares produces_grads (the step has: {names})")
    return [*parts[: i + 1], *new, *parts[i + 1 :]]
