"""functrain: PyTorch training as one immutable state and one pure step.

state = functrain.create(model, loss=..., optimizer=..., transforms=[...])
state = functrain.step(state, batch)

The package is in layers, and imports point one way: `run` (the CLI and its loop) ->
`checkpoint`, `dist`, `recipe` -> the core (this module and what it names: state, step,
transform, parallel, optim, schedule, rng, losses, precision, determinism, deferred, recompute,
models, data, errors). The core imports nothing of the layers above it, nor `torch.distributed`
(tests/test_layers.py checks).
"""

from functrain.errors import ConsumedStateError
from functrain.optim import Optimizer, adamw, sgd
from functrain.parallel import Placement
from functrain.precision import Precision
from functrain.rng import fold_in
from functrain.state import Static, TrainState, create, load_into
from functrain.steps import apply_optimizer, clip_by_global_norm, ema, forward_backward, step
from functrain.transform import Transform, compose

__all__ = [
    "ConsumedStateError",
    "Optimizer",
    "Placement",
    "Precision",
    "Static",
    "TrainState",
    "Transform",
    "adamw",
    "apply_optimizer",
    "clip_by_global_norm",
    "compose",
    "create",
    "ema",
    "fold_in",
    "forward_backward",
    "load_into",
    "sgd",
    "step",
]
