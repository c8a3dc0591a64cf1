"""From a validated recipe to the objects a run needs: the state at step 0 and the data.

Nothing here runs a step but `probe`'s trial step; the `Trainer` runs the rest. Building
is deterministic: the model's initial weights come from a seed derived from the recipe's
seed, not from the global RNG.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_map
from torchdata.stateful_dataloader import StatefulDataLoader

from functrain import canonical, determinism, distributed, recompute, rng
from functrain import data as data_lib
from functrain.distributed import fsdp
from functrain.errors import BuildError, FunctrainError, UserError
from functrain.precision import Precision
from functrain.recipe import Component, Recipe, instantiate
from functrain.run import sinks
from functrain.state import TrainState, create
from functrain.steps import step as run_step
from functrain.transform import insert_after

__all__ = [
    "Built",
    "build",
    "build_and_probe",
    "data_seed",
    "probe",
    "resolve_device",
    "sharded",
    "to_device",
    "train_loader",
    "val_loader",
]

#: Exceptions a component raises when the recipe's values do not suit it (a bad width, a
#: model shorter than the data's blocks, a shape torch refuses). Anything else is a bug.
_USER_CAUSED = (ValueError, TypeError, IndexError, KeyError, ArithmeticError, OSError, RuntimeError)


@attrs.frozen(kw_only=True)
class Built:
    """What one process of a run works with."""

    recipe: Recipe
    context: distributed.Context
    state: TrainState
    train: Any  # the training dataset
    val: Any | None  # the validation dataset, when the data component gives one
    fingerprint: dict
    device: torch.device
    local_batch: int  # per-rank batch size
    sharding: fsdp.Sharding | None  # FSDP2: every rank holds (and writes) its shards
    determinism: dict  # the settings `functrain.determinism.configure` made, for manifests


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
    except Exception as err:
        if not _caused_by_values(err):
            raise
        raise BuildError(f"{field} ({component.target}): {type(err).__name__}: {err}") from err


def _caused_by_values(err: Exception) -> bool:
    """Whether `err` says the recipe's values do not fit (then a BuildError names the field,
    the cause chained); otherwise it is a bug, or a lost peer, and keeps its traceback."""
    if isinstance(err, FunctrainError):
        return isinstance(err, UserError)
    if isinstance(err, RuntimeError) and distributed.peer_failure(err) is not None:
        return False
    return isinstance(err, _USER_CAUSED)


def data_seed(recipe: Recipe) -> int:
    """The shuffling seed, derived from the run's seed (`functrain.rng.data_seed`)."""
    return rng.data_seed(recipe.seed)


def micro_batch_size(recipe: Recipe) -> tuple[str, int] | None:
    """(field, M) of the recipe's `forward_backward(micro_batch_size=M)` step, when it has
    one: the run is canonical (`functrain.canonical`)."""
    for i, part in enumerate(recipe.step):
        size = part.kwargs.get("micro_batch_size")
        if part.target.rsplit(".", 1)[-1] == "forward_backward" and size is not None:
            return f"step.{i}.micro_batch_size", size
    return None


def world_size_exact(recipe: Recipe, world_size: int) -> bool:
    """Whether a run of `recipe` gives the same bits on any fitting number of processes:
    canonical micro-batches and an unsharded (ddp) state."""
    return micro_batch_size(recipe) is not None and not sharded(recipe, world_size)


def _check_canonical(recipe: Recipe, world_size: int) -> None:
    found = micro_batch_size(recipe)
    if found is None:
        return
    field, size = found
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return  # forward_backward itself refuses it, naming the field
    try:
        canonical.check_fit(world_size, recipe.data.batch_size, size)
    except ValueError as err:
        raise BuildError(f"{field} with data.batch_size {recipe.data.batch_size}: {err}") from err


def sharded(recipe: Recipe, world_size: int) -> bool:
    """Whether a run of `recipe` on `world_size` processes shards its state with FSDP2."""
    return recipe.parallel == "fsdp" and world_size > 1


def build(recipe: Recipe, ctx: distributed.Context | None = None) -> Built:
    """Instantiate the recipe's components and the state at step 0 for this process.

    Under torchrun the gradient all-reduce goes right after `forward_backward`.
    """
    ctx = ctx or distributed.Context()
    if recipe.data.batch_size % ctx.world_size:
        raise BuildError(
            f"data.batch_size ({recipe.data.batch_size}) is the global batch and must be "
            f"divisible by the number of processes ({ctx.world_size})"
        )
    _check_canonical(recipe, ctx.world_size)
    device = resolve_device(recipe.device, ctx.rank)
    exactness = determinism.configure(device, compiled=recipe.compile.enabled)
    splits = _make("data.dataset", recipe.data.dataset)
    if not isinstance(splits, dict) or "train" not in splits:
        raise BuildError(
            f"data.dataset ({recipe.data.dataset.target}) must return a dict with a 'train' "
            f"dataset (and optionally 'val'), got {type(splits).__name__}"
        )
    with rng.seeded(rng.init_seed(recipe.seed)):  # the global RNG is left as it was
        model = _make("model", recipe.model)
    if recipe.activation_checkpointing:
        _checkpoint_activations(model, sharded(recipe, ctx.world_size))
    precision = _precision(recipe)
    sharding = None
    if sharded(recipe, ctx.world_size):
        if recipe.compile.enabled:
            raise BuildError(
                "compile: true is not supported with parallel: fsdp under torchrun yet; use "
                "parallel: ddp, or compile: false"
            )
        fsdp.shard(
            model.to(device),
            world_size=ctx.world_size,
            device=device.type,
            compute_dtype=precision.compute_dtype,
        )
        sharding = fsdp.Sharding.of(model)
    if recipe.compile.enabled:
        # Static shapes: a graph per shape, never one made dynamic by the shapes seen before
        # (eval's batch is not training's micro-batch), so what runs depends on no history.
        model.compile(mode=recipe.compile.mode, dynamic=False)
    state = create(
        model,
        loss=_make("loss", recipe.loss),
        optimizer=_make("optim", recipe.optim),
        schedule=_make("schedule", recipe.schedule),
        transforms=_transforms(recipe, ctx, sharding is not None),
        seed=recipe.seed,
        device=device,
        placement=ctx,
        sharding=sharding,
        precision=precision,
    )
    fingerprint = data_lib.fingerprint(
        splits["train"],
        batch_size=recipe.data.batch_size,
        shuffle=recipe.data.shuffle,
        seed=data_seed(recipe),
    )
    return Built(
        recipe=recipe,
        context=ctx,
        state=state,
        train=splits["train"],
        val=splits.get("val"),
        fingerprint=fingerprint,
        device=device,
        local_batch=recipe.data.batch_size // ctx.world_size,
        sharding=sharding,
        determinism=exactness,
    )


def _precision(recipe: Recipe) -> Precision:
    scale = recipe.loss_scale
    return Precision(
        recipe.precision,
        init_scale=scale.init,
        growth_factor=scale.growth_factor,
        backoff_factor=scale.backoff_factor,
        growth_interval=scale.growth_interval,
    )


def _checkpoint_activations(model: Any, is_sharded: bool) -> None:
    if is_sharded:
        raise BuildError(
            "activation_checkpointing: true is not supported with parallel: fsdp under "
            "torchrun yet; use parallel: ddp, or activation_checkpointing: false"
        )
    try:
        recompute.checkpoint_blocks(model)
    except ValueError as err:
        raise BuildError(f"activation_checkpointing: {err}") from err


def _transforms(recipe: Recipe, ctx: distributed.Context, is_sharded: bool) -> list:
    transforms = [_make(f"step.{i}", c) for i, c in enumerate(recipe.step)]
    extra = distributed.transforms(
        ctx, sharded=is_sharded, canonical=micro_batch_size(recipe) is not None
    )
    if not extra:
        return transforms
    try:
        return insert_after(transforms, "forward_backward", extra)
    except ValueError as err:
        raise BuildError(
            f"step: {err}. Under torchrun the gradient all-reduce goes right after it: "
            "list functrain.steps.forward_backward in the recipe's step"
        ) from err


def train_loader(built: Built, *, start: int) -> StatefulDataLoader:
    """This rank's training loader, positioned at `start` global samples (the state's cursor)."""
    r, ctx = built.recipe, built.context
    return data_lib.make_loader(
        built.train,
        batch_size=built.local_batch,
        seed=data_seed(r),
        shuffle=r.data.shuffle,
        start=start,
        world_size=ctx.world_size,
        rank=ctx.rank,
        num_workers=r.data.num_workers,
        pin_memory=built.device.type == "cuda",
        replay=r.data.replay,
    )


def val_loader(built: Built) -> StatefulDataLoader | None:
    """This rank's validation loader, in order from the first sample; None without val data."""
    if built.val is None:
        return None
    ctx = built.context
    return data_lib.make_loader(
        built.val,
        batch_size=built.local_batch,
        seed=0,
        shuffle=False,
        world_size=ctx.world_size,
        rank=ctx.rank,
    )


def build_and_probe(recipe: Recipe, ctx: distributed.Context) -> Built:
    """`build`, then `probe`, on every rank; a failure on any rank (e.g. missing data) fails
    all of them alike."""

    def both() -> Built:
        sinks.require(recipe)
        built = build(recipe, ctx)
        probe(built)
        return built

    return ctx.all_ok(both)


def probe(built: Built) -> None:
    """One trial step on a copy of the state and the first batch, its result thrown away.

    Parts that validate one by one but do not fit together (a model shorter than the data's
    blocks, a batch that does not split into micro-batches) fail here, before any file is
    written. The copy keeps the state, the cursor and the global RNG untouched.
    """
    loader = train_loader(built, start=0)
    stateful = data_lib.is_stateful(built.train)
    # The trial batch moves a stateful iterable: keep its state (checked to be JSON) to put back.
    saved = copy.deepcopy(data_lib.data_state(built.train)) if stateful else None
    try:
        batch = to_device(next(iter(loader)), built.device)
        run_step(built.state, batch, donate=False)
    except Exception as err:
        if not _caused_by_values(err):
            raise
        raise BuildError(
            f"the recipe's parts do not fit together: a trial step on the first batch failed "
            f"with {type(err).__name__}: {err}. Check that model, loss, data and step agree "
            "(e.g. model.block_size >= data.dataset.block_size, model.vocab_size covers the "
            "data, data.batch_size per process divides into the micro_batches of step)."
        ) from err
    finally:
        if stateful:
            built.train.load_state_dict(saved)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of `batch` on `device` (asynchronously from pinned memory on CUDA)."""
    non_blocking = device.type == "cuda"
    return tree_map(
        lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
        batch,
    )
