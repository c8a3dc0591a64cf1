"""From a validated recipe to the objects a run needs: the state at step 0 and the data.

Nothing here runs a step; `loop.py` does. Building is deterministic: the model's initial
weights come from a seed derived from the recipe's seed, not from the global RNG.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from functrain import data as data_lib
from functrain import fsdp, rng
from functrain.loop import to_device
from functrain.recipe import Component, Recipe, instantiate
from functrain.state import TrainState, create
from functrain.step import step as run_step


class BuildError(ValueError):
    """The recipe validated but its parts do not fit together (e.g. batch vs world size)."""


@attrs.frozen(kw_only=True)
class Built:
    """What one process of a run works with."""

    recipe: Recipe
    state: TrainState
    train: Any  # the training dataset
    val: Any | None  # the validation dataset, when the data component gives one
    fingerprint: dict
    device: torch.device
    local_batch: int  # per-rank batch size


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present (one device per local rank), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BuildError(
                "device: 'cuda' was asked for but torch sees no CUDA device; use device=cpu"
            )
        if device.index is None:
            device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def _make(field: str, component: Component, **extra: Any) -> Any:
    """Instantiate a component; a bad argument value becomes an error naming the field."""
    try:
        return instantiate(component, **extra)
    except Exception as err:  # any failure to construct is the recipe's values at fault
        raise BuildError(f"{field} ({component.target}): {type(err).__name__}: {err}") from None


def data_seed(recipe: Recipe) -> int:
    """The shuffling seed, derived from the run's seed."""
    return rng.fold_in(recipe.seed, "data")


def sharded(recipe: Recipe, world_size: int) -> bool:
    """Whether a run of `recipe` on `world_size` processes shards its state with FSDP2."""
    return recipe.parallel == "fsdp" and world_size > 1


def build(recipe: Recipe, *, world_size: int = 1, rank: int = 0, transforms_extra=()) -> Built:
    """Instantiate the recipe's components and the state at step 0.

    `transforms_extra` is inserted right after the first transform (forward/backward):
    the distributed gradient all-reduce goes there.
    """
    if recipe.data.batch_size % world_size:
        raise BuildError(
            f"data.batch_size ({recipe.data.batch_size}) is the global batch and must be "
            f"divisible by the number of processes ({world_size})"
        )
    device = resolve_device(recipe.device, rank)
    splits = _make("data.dataset", recipe.data.dataset)
    if not isinstance(splits, dict) or "train" not in splits:
        raise BuildError(
            f"data.dataset ({recipe.data.dataset.target}) must return a dict with a 'train' "
            f"dataset (and optionally 'val'), got {type(splits).__name__}"
        )
    # Initial weights from the recipe's seed, leaving the global RNG as it was.
    with rng.seeded(rng.fold_in(recipe.seed, "init")):
        model = _make("model", recipe.model)
    if sharded(recipe, world_size):
        fsdp.shard(model.to(device), world_size=world_size, device=device.type)
    transforms = [_make(f"step.{i}", c) for i, c in enumerate(recipe.step)]
    transforms[1:1] = list(transforms_extra)
    state = create(
        model,
        loss=_make("loss", recipe.loss),
        optimizer=_make("optim", recipe.optim),
        schedule=_make("schedule", recipe.schedule),
        transforms=transforms,
        seed=recipe.seed,
        device=device,
        world_size=world_size,
        rank=rank,
    )
    fingerprint = data_lib.fingerprint(
        splits["train"],
        batch_size=recipe.data.batch_size,
        shuffle=recipe.data.shuffle,
        seed=data_seed(recipe),
    )
    return Built(
        recipe=recipe,
        state=state,
        train=splits["train"],
        val=splits.get("val"),
        fingerprint=fingerprint,
        device=device,
        local_batch=recipe.data.batch_size // world_size,
    )


def train_loader(built: Built, *, start: int, world_size: int = 1, rank: int = 0):
    """The training loader, positioned at `start` global samples (the state's cursor)."""
    r = built.recipe
    return data_lib.make_loader(
        built.train,
        batch_size=built.local_batch,
        seed=data_seed(r),
        shuffle=r.data.shuffle,
        start=start,
        world_size=world_size,
        rank=rank,
        num_workers=r.data.num_workers,
        pin_memory=built.device.type == "cuda",
    )


def probe(built: Built, *, world_size: int = 1, rank: int = 0) -> None:
    """One trial step on a copy of the state and the first batch, its result thrown away.

    Parts that validate one by one but do not fit together (a model shorter than the data's
    blocks, a batch that does not split into micro-batches) fail here, before any file is
    written. The copy keeps the state, the cursor and the global RNG untouched.
    """
    loader = train_loader(built, start=0, world_size=world_size, rank=rank)
    try:
        batch = to_device(next(iter(loader)), built.device)
        run_step(built.state, batch, donate=False)
    except Exception as err:  # the message carries the cause; the traceback would not help
        raise BuildError(
            f"the recipe's parts do not fit together: a trial step on the first batch failed "
            f"with {type(err).__name__}: {err}. Check that model, loss, data and step agree "
            "(e.g. model.block_size >= data.dataset.block_size, model.vocab_size covers the "
            "data, data.batch_size per process divides into the micro_batches of step)."
        ) from None
