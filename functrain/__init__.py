"""functrain: PyTorch training as one immutable state and one pure step.

state = functrain.create(model, loss=..., optimizer=..., transforms=[...])
state = functrain.step(state, batch)
"""

from functrain.optim import Optimizer, adamw, sgd
from functrain.rng import fold_in
from functrain.state import ConsumedStateError, Static, TrainState, create
from functrain.step import (
    apply_optimizer,
    clip_by_global_norm,
    compose,
    ema,
    forward_backward,
    step,
)

__all__ = [
    "ConsumedStateError",
    "Optimizer",
    "Static",
    "TrainState",
    "adamw",
    "apply_optimizer",
    "clip_by_global_norm",
    "compose",
    "create",
    "ema",
    "fold_in",
    "forward_backward",
    "sgd",
    "step",
]
