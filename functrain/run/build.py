"""From a validated recipe to the objects a run needs: the state at step 0 and the data.

Nothing here runs a step but `probe`'s trial step; the `Trainer` runs the rest. Building
is deterministic: the model's initial weights come from a seed derived from the recipe's
seed, not from the global RNG.
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map
from torchdata.stateful_dataloader import StatefulDataLoader

from functrain import canonical, checkpoint, deferred, determinism, distributed, recompute, rng
from functrain import data as data_lib
from functrain.distributed import fsdp
from functrain.errors import (
    BuildError,
    ComponentError,
    ConfigError,
    DataError,
    UserError,
    warn,
)
from functrain.metrics import Metric, as_metric
from functrain.precision import Precision
from functrain.recipe import Component, Recipe, instantiate, resolve, to_dict
from functrain.run import sinks
from functrain.state import TrainState, create, tied_names
from functrain.steps import advance
from functrain.steps import step as run_step
from functrain.transform import Transform, as_transform, gradient_source, insert_after_gradients

__all__ = [
    "Built",
    "build",
    "build_and_probe",
    "check_world_size",
    "step_parts",
    "data_seed",
    "probe",
    "resolve_device",
    "sharded",
    "to_device",
    "train_loader",
    "val_loader",
]


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
    parts: StepParts  # the recipe's step transforms, before the reduction goes in
    metrics: tuple[Metric, ...]  # the recipe's eval metrics
    init_from: dict | None  # the weights the run started from: path, format, sha256
    determinism: dict  # the settings `functrain.determinism.configure` made, for manifests
    description: dict  # what this run is (`functrain.checkpoint.describe`): every manifest
    # records it, and the resume plan compares a snapshot's with it


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` is `cuda:LOCAL_RANK` (the process's
    place on its node: on a second node rank 8 is local rank 0), or `cuda:0` where the
    process sees one GPU only, made the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BuildError(
                "device: 'cuda' was asked for but torch sees no CUDA device; use device=cpu"
            )
        count = torch.cuda.device_count()
        if device.index is None:
            if count == 1:  # one GPU made visible to each process (CUDA_VISIBLE_DEVICES)
                local_rank = 0
            if local_rank >= count:
                raise BuildError(
                    f"this process is local rank {local_rank} on its node, which has {count} "
                    "CUDA device(s): start at most one process per GPU "
                    "(torchrun --nproc_per_node)"
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL, FSDP's mesh and `cuda` tensors all use it
    return device


def _make(field: str, component: Component, **extra: Any) -> Any:
    """Instantiate a component. When functrain's own component (or torch, called from it)
    refuses the recipe's values, a ComponentError names the field and where it was raised,
    the cause chained. What a user's own code raises is theirs to debug: it keeps its
    traceback, as does a lost peer under torchrun."""
    try:
        return instantiate(component, **extra)
    except UserError as err:
        raise ComponentError(f"{field} ({component.target}): {err}") from err
    except Exception as err:
        if distributed.peer_failure(err) is not None or _raised_in_user_code(err):
            raise
        raise ComponentError(
            f"{field} ({component.target}) raised {type(err).__name__}: {err} (in {_where(err)})"
        ) from err


def _as(convert: Any, field: str, value: Any) -> Any:
    """`convert(value)` (a transform, a metric); what it refuses names the field."""
    try:
        return convert(value)
    except TypeError as err:
        raise ComponentError(f"{field}: {err}") from err


def _innermost(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `err`'s traceback outside torch (where it was raised, as the
    code that called torch sees it), or None."""
    frames = traceback.extract_tb(err.__traceback__)
    return next((f for f in reversed(frames) if not _in(f.filename, _TORCH)), None)


def _raised_in_user_code(err: BaseException) -> bool:
    frame = _innermost(err)
    return frame is not None and not _in(frame.filename, _PACKAGE)


def _where(err: BaseException) -> str:
    """`file:line in function` of `_innermost(err)`."""
    f = _innermost(err)
    return "torch" if f is None else f"{Path(f.filename).name}:{f.lineno} in {f.name}"


_TORCH = Path(torch.__file__).resolve().parent
_PACKAGE = Path(__file__).resolve().parents[1]


def _in(filename: str, folder: Path) -> bool:
    return Path(filename).resolve().is_relative_to(folder)


def _component_files(recipe: Recipe) -> set[Path]:
    """The source files of the model, loss and dataset the recipe names."""
    files = set()
    for component in (recipe.model, recipe.loss, recipe.data.dataset):
        module = sys.modules.get(getattr(resolve(component.target)[0], "__module__", ""))
        if getattr(module, "__file__", None):
            files.add(Path(module.__file__).resolve())
    return files


def _raised_by_component(err: BaseException, recipe: Recipe) -> bool:
    """Whether the innermost frame of `err` outside torch lies in code the recipe named
    (its model, loss or dataset) or outside functrain altogether (a user's module, a
    library it calls): then the parts do not fit, which is the recipe's to fix. A frame in
    functrain's own machinery makes it a bug, which keeps its traceback."""
    frame = _innermost(err)
    return frame is not None and (
        _raised_in_user_code(err) or Path(frame.filename).resolve() in _component_files(recipe)
    )


def data_seed(recipe: Recipe) -> int:
    """The shuffling seed, derived from the run's seed (`functrain.rng.data_seed`)."""
    return rng.data_seed(recipe.seed)


@attrs.frozen(kw_only=True)
class StepParts:
    """The recipe's step transforms, made, and what they declare (`functrain.transform`)."""

    parts: tuple[Transform, ...]
    grads: int | None  # the index of the part that produces gradients
    micro_batch_size: int | None  # canonical micro-batches: their size, declared by it
    field: str | None  # the recipe field of that part, for messages


def step_parts(recipe: Recipe) -> StepParts:
    """Make the recipe's step transforms (factories: cheap, nothing runs) and read their
    declarations."""
    parts = tuple(
        _as(as_transform, f"step.{i}", _make(f"step.{i}", c)) for i, c in enumerate(recipe.step)
    )
    try:
        i = gradient_source(parts)
    except ValueError as err:
        raise BuildError(f"step: {err}; list one forward_backward") from err
    return StepParts(
        parts=parts,
        grads=i,
        micro_batch_size=None if i is None else parts[i].micro_batch_size,
        field=None if i is None else f"step.{i}",
    )


def world_size_exact(recipe: Recipe, parts: StepParts | None = None) -> bool:
    """Whether a run of `recipe` gives the same bits on any fitting number of processes:
    canonical micro-batches, sharded (fsdp) or not."""
    parts = parts or step_parts(recipe)
    return parts.micro_batch_size is not None


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """Refuse a world size that does not fit the recipe's canonical micro-batch layout, by
    name: cheap (nothing is built), so a resume says it before reading any snapshot."""
    _check_canonical(recipe, world_size, step_parts(recipe))


def _check_canonical(recipe: Recipe, world_size: int, parts: StepParts) -> None:
    size = parts.micro_batch_size
    if size is None:
        return
    try:
        canonical.check_fit(world_size, recipe.data.batch_size, size)
    except ValueError as err:
        raise BuildError(
            f"{parts.field}.micro_batch_size with data.batch_size {recipe.data.batch_size}: {err}"
        ) from err


def sharded(recipe: Recipe, world_size: int) -> bool:
    """Whether a run of `recipe` on `world_size` processes shards its state with FSDP2."""
    return recipe.parallel == "fsdp" and world_size > 1


def build(
    recipe: Recipe, ctx: distributed.Context | None = None, *, splits: dict | None = None
) -> Built:
    """Instantiate the recipe's components and the state at step 0 for this process;
    `splits`: the datasets of an earlier build of the same recipe, reused.

    Under torchrun the gradient all-reduce goes right after `forward_backward`.
    """
    ctx = ctx or distributed.Context()
    if recipe.data.batch_size % ctx.world_size:
        raise BuildError(
            f"data.batch_size ({recipe.data.batch_size}) is the global batch and must be "
            f"divisible by the number of processes ({ctx.world_size})"
        )
    parts = step_parts(recipe)
    _check_canonical(recipe, ctx.world_size, parts)
    device = resolve_device(recipe.device, ctx.local_rank)
    exactness = determinism.configure(
        device, recipe.compile.enabled, mode=recipe.determinism, tf32=recipe.tf32
    )
    splits = splits if splits is not None else _make("data.dataset", recipe.data.dataset)
    if not isinstance(splits, dict) or "train" not in splits:
        raise BuildError(
            f"data.dataset ({recipe.data.dataset.target}) must return a dict with a 'train' "
            f"dataset (and optionally 'val'), got {type(splits).__name__}"
        )
    later = _deferred(recipe, ctx)  # on meta, made after sharding: see `_deferred`
    if later is not None:
        model = later.module
    else:
        with rng.seeded(rng.init_seed(recipe.seed)):  # the global RNG is left as it was
            model = _make("model", recipe.model)
    init = None
    if recipe.init_from is not None:  # before freezing and sharding: the whole model
        init = checkpoint.init_from(model, recipe.init_from, recipe.init_from_map)
    _freeze(model, recipe.freeze, ctx.warn)
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
            model if later is not None else model.to(device),
            world_size=ctx.world_size,
            device=device.type,
            # canonical: float32 gathers, and autocast casts as in an unsharded run
            compute_dtype=None if parts.micro_batch_size else precision.compute_dtype,
        )
    if later is not None:
        _materialize(later, device, recipe.seed)
    if sharded(recipe, ctx.world_size):
        sharding = fsdp.Sharding.of(model, canonical=parts.micro_batch_size is not None)
    replicated = None  # ddp: gradients reduced as backward runs
    if sharding is None and ctx.world_size > 1 and recipe.bucket_mb > 0:
        replicated = distributed.Overlapped(ctx.world_size, int(recipe.bucket_mb * (1 << 20)))
    if recipe.compile.enabled:
        # Static shapes: a graph per shape, never one made dynamic by the shapes seen before
        # (eval's batch is not training's micro-batch), so what runs depends on no history.
        model.compile(mode=recipe.compile.mode, dynamic=False)
    state = create(
        model,
        loss=_make("loss", recipe.loss),
        optimizer=_make("optim", recipe.optim),
        schedule=_make("schedule", recipe.schedule),
        transforms=_with_reduction(parts, ctx, sharding or replicated),
        seed=recipe.seed,
        device=device,
        placement=ctx,
        sharding=sharding or replicated,
        precision=precision,
        nan_policy=recipe.nan_policy,
    )
    if recipe.eval.batches == "all" and data_lib.is_plain_iterable(splits.get("val")):
        raise BuildError(
            "eval.batches: 'all' needs a validation set with a length; the val dataset is an "
            "IterableDataset: give eval.batches a number"
        )
    fingerprint = data_lib.fingerprint(
        splits["train"],
        batch_size=recipe.data.batch_size,
        shuffle=recipe.data.shuffle,
        seed=data_seed(recipe),
    )
    trainable_only = recipe.checkpoint.trainable_only
    described = checkpoint.describe(  # what every manifest records, and a resume compares
        recipe=to_dict(recipe),
        data=fingerprint,
        device=device.type,
        world_size=ctx.world_size,
        world_size_exact=world_size_exact(recipe, parts),
        determinism=exactness,
        init_from=init,
        tied=tied_names(state.static.model),
        frozen_sha256=checkpoint.frozen_hash(state) if trainable_only else None,
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
        parts=parts,
        metrics=tuple(
            _as(as_metric, f"metrics.{i}", _make(f"metrics.{i}", c))
            for i, c in enumerate(recipe.metrics)
        ),
        init_from=init,
        determinism=exactness,
        description=described,
    )


def _deferred(recipe: Recipe, ctx: distributed.Context) -> deferred.Deferred | None:
    """Under torchrun, a model whose class says it `replays_on_meta` (functrain's own) is
    built on the meta device and made later, after sharding, on its device: no process
    ever holds the whole of it (FSDP: each rank makes only its rows), with bitwise the
    values of an eager build (`functrain.deferred`). Not with `init_from`, which loads
    whole weights into the whole model."""
    if ctx.world_size == 1 or recipe.init_from is not None:
        return None
    target, _ = resolve(recipe.model.target)
    if not getattr(target, "__dict__", {}).get("replays_on_meta", False):  # not inherited
        return None
    try:  # a failure the eager build will name, or a constructor meta cannot replay
        return deferred.record(lambda: instantiate(recipe.model))
    except Exception as err:  # noqa: BLE001 -- the eager build decides
        ctx.warn(f"model ({recipe.model.target}): built eagerly on every rank ({err})")
        return None


@torch.no_grad()
def _materialize(later: deferred.Deferred, device: torch.device, seed: int) -> None:
    """The deferred model's tensors on `device`, this rank's rows of sharded ones."""
    model = later.module
    model.to_empty(device=device)
    found = dict(model.named_parameters()) | dict(model.named_buffers())

    def put(name: str, full: torch.Tensor) -> None:
        mine = found[name]
        if isinstance(mine, DTensor):  # FSDP2: rows of dim 0, in rank order
            local = mine.to_local()
            if local.numel():
                rows = full.chunk(mine.device_mesh.size(), dim=0)[mine.device_mesh.get_local_rank()]
                local.copy_(rows)
        else:
            mine.copy_(full)

    with rng.seeded(rng.init_seed(seed)):  # the eager build's draws, in its order
        later.materialize(put)


def _freeze(model: Any, patterns: list[str], say: Callable[[str], None] = warn) -> None:
    """`requires_grad_(False)` on the parameters whose names match one of `patterns`
    (`fnmatch`: `*` spans dots too); a pattern that matches none is refused by name. A tied
    weight's every name counts (`lm_head.weight` of a GPT-2 tied to `transformer.wte.weight`):
    the one tensor is frozen under both, which a warning says."""
    if not patterns:
        return
    named = dict(model.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}  # each tensor -> all its names (tied weights: several)
    for name, p in named.items():
        names.setdefault(id(p), []).append(name)
    matched = set()
    for pattern in patterns:
        hits = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise BuildError(
                f"freeze: {pattern!r} matches no parameter of the model; its parameters "
                f"are named like: {shown}"
            )
        matched.update(hits)
        for name in hits:
            named[name].requires_grad_(False)
    for group in names.values():
        if len(group) > 1 and matched & set(group) and not set(group) <= matched:
            asked = sorted(set(group) & matched)
            say(f"freeze: {', '.join(asked)} is tied to {', '.join(sorted(set(group) - matched))} "
                 "(one tensor): both are frozen")  # fmt: skip


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


def _with_reduction(parts: StepParts, ctx: distributed.Context, sharding: Any) -> list:
    """The step's transforms, with the gradient reduction of several processes right after
    the one that declares `produces_grads` (the canonical tree when it declares a
    `micro_batch_size`)."""
    extra = distributed.transforms(
        ctx,
        sharded=isinstance(sharding, fsdp.Sharding),
        canonical=parts.micro_batch_size is not None,
    )
    if not extra:
        return list(parts.parts)
    try:
        return insert_after_gradients(parts.parts, extra)
    except ValueError as err:
        raise BuildError(
            f"step: {err}. Under torchrun the gradient reduction goes right after the "
            "transform that produces gradients: list functrain.steps.forward_backward, or "
            "declare your own with Transform(..., produces_grads=True) (or wrap "
            "forward_backward with its .wrap method, which keeps its declarations)"
        ) from err


def train_loader(built: Built, *, start: int, restored: bool = False) -> StatefulDataLoader:
    """This rank's training loader, positioned at `start` global samples (the state's cursor);
    `restored`: a stateful iterable already stands there (`functrain.data.restore`)."""
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
        restored=restored,
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


def build_and_probe(recipe: Recipe, ctx: distributed.Context, *, resuming: bool = False) -> Built:
    """`build`, then `probe`, on every rank; a failure on any rank (e.g. missing data) fails
    all of them alike.

    The trial step spends the state it runs on: a copy to keep it would double the state in
    memory at the start. So a run builds its state again afterwards, from the seed (bitwise
    the first; the datasets are reused), once the trial state is gone; a resume (`resuming`)
    gets the spent state, to read its snapshot into in place (every entry overwritten)."""

    def both() -> Built:
        sinks.require(recipe)
        trial = probe(build(recipe, ctx))
        if resuming:
            return trial
        splits = {"train": trial.train, "val": trial.val}
        del trial
        gc.collect()  # the trial state, with its model, before the run's is made
        return build(recipe, ctx, splits=splits)

    return ctx.all_ok(both)


def probe(built: Built) -> Built:
    """One trial step of the built state on the first batch; `built` with the state it
    gave, which holds step 1 (the step spends the state it was given: no copy).

    Parts that validate one by one but do not fit together (a model shorter than the data's
    blocks, a batch that does not split into micro-batches) fail here, before any file is
    written. The cursor of a stateful iterable and the global RNG are left untouched.
    """
    loader = train_loader(built, start=0)
    stateful = data_lib.is_stateful(built.train)
    # The trial batch moves a stateful iterable: keep its state (checked to be JSON) to put back.
    saved = copy.deepcopy(data_lib.data_state(built.train)) if stateful else None
    try:
        batch = next(iter(loader))
        _warn_listed_fields(batch, built.context)
        batch = to_device(batch, built.device)
        if built.context.world_size == 1:  # the parts are the whole step: walk them
            return attrs.evolve(built, state=_trial_parts(built, batch))
        return attrs.evolve(built, state=run_step(built.state, batch))
    except (BuildError, DataError, ComponentError):
        raise  # already names what to change
    except Exception as err:
        if (op := determinism.refused_op(err)) is not None:
            raise BuildError(determinism.refusal(op)) from err
        misfit = isinstance(err, ConfigError) or _raised_by_component(err, built.recipe)
        if distributed.peer_failure(err) is not None or not misfit:
            raise
        raise ComponentError(
            f"the recipe's parts do not fit together: a trial step on the first batch failed "
            f"with {type(err).__name__}: {err} (in {_where(err)}). Check that model, loss, "
            "data and step agree "
            "(e.g. model.block_size >= data.dataset.block_size, model.vocab_size covers the "
            "data, data.batch_size per process divides into the micro_batches of step)."
        ) from err
    finally:
        if stateful:
            built.train.load_state_dict(saved)


def _warn_listed_fields(batch: Any, ctx: distributed.Context) -> None:
    """Say so when collation made a batch field a list of tensors of one value per sample:
    what samples holding Python lists become (an HF `datasets.Dataset` gives them until
    `with_format("torch")`), cut position by position. Only said, not refused: several
    targets per sample (`(x, (y1, y2))`) look the same, and are fine."""
    if not isinstance(batch, (Mapping, list, tuple)):
        return
    for key, value in batch.items() if isinstance(batch, Mapping) else enumerate(batch):
        if (
            isinstance(value, list)
            and len(value) > 2
            and all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value)
        ):
            ctx.warn(
                f"data.dataset: the first batch's field {key!r} is a list of {len(value)} "
                "tensors of one value per sample, not one tensor: do the samples hold Python "
                "lists? Collation cuts those position by position. Give tensors: for a "
                "Hugging Face datasets.Dataset, dataset.with_format('torch') (or "
                "set_format('torch')); for your own, return torch tensors from __getitem__"
            )


def _trial_parts(built: Built, batch: Any) -> TrainState:
    """`step(built.state, batch)` part by part, checking that the part that leaves
    gradients in the state declares it: the reduction of a run on several processes, and
    canonical mode, are placed by that declaration alone."""
    state = built.state
    for i, part in enumerate(built.parts.parts):
        had = state.grads is not None
        state = part.apply(state, batch)
        if not had and state.grads is not None and not part.produces_grads:
            raise BuildError(
                f"step.{i} ({part.name}) leaves gradients in the state but does not declare "
                "it, so under torchrun no reduction would follow it and canonical "
                "micro-batches would be lost. Wrap forward_backward with its .wrap method "
                "(which keeps its declarations), or build the transform with "
                "Transform(..., produces_grads=True)"
            )
    return advance(state, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of `batch` on `device` (asynchronously from pinned memory on CUDA)."""
    non_blocking = device.type == "cuda"
    return tree_map(
        lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t,
        batch,
    )
