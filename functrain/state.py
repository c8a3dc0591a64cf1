"""`TrainState`: everything that changes during training, as one immutable value.

The saved entries (all TensorDicts or 0-d tensors) are kept apart from the static part —
the model skeleton, loss, optimizer, schedule and step transforms — which is rebuilt from
the recipe and never written to disk (flax's `pytree_node=False`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from tensordict import TensorDict
from torch import nn

from functrain import rng
from functrain.errors import ConfigError, ConsumedStateError
from functrain.optim import Optimizer
from functrain.parallel import (
    UNSHARDED,
    Placement,
    Sharding,
    Unsharded,
    aliases,
    swapped_into,
)
from functrain.precision import Precision
from functrain.schedule import Schedule, constant
from functrain.transform import Transform, compose

#: The entries a snapshot holds, in order. `params` are the trainable parameters; `frozen`
#: the others (`requires_grad=False`, or a recipe's `freeze:`): bound into the model like
#: params, but no gradient, optimizer state, weight decay or reduction ever touches them.
ENTRIES = ("step", "params", "frozen", "buffers", "opt", "rng", "data", "stats", "ema", "metrics")
#: Entries a snapshot written before they existed may lack; they are then empty.
_ADDED_LATER = ("frozen",)
#: Leaves a snapshot written before they existed may lack; they then keep this state's.
ADDED_LEAVES = (("stats", "nonfinite_steps"), ("stats", "first_nonfinite"))
#: Their values at step 0, which an older snapshot is taken to have held.
_ADDED_AT_0 = {"nonfinite_steps": 0, "first_nonfinite": -1}
#: What a step does when its loss or gradients are not finite (`create`'s `nan_policy`).
NAN_POLICIES = ("stop", "skip", "continue")
#: Entries that live between transforms of one step only (gradients), never saved.
TRANSIENT = ("grads",)

_SHOWN = 3  # mismatches of each kind a misfit snapshot's error lists before "and N more"
__all__ = [
    "ENTRIES",
    "TRANSIENT",
    "ConsumedStateError",
    "Static",
    "TrainState",
    "create",
    "load_into",
    "weights",
]


@attrs.frozen(kw_only=True)
class Static:
    """The part of the state rebuilt from the recipe, never saved."""

    model: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: Optimizer
    schedule: Schedule
    transform: Transform
    placement: Placement = Placement()
    #: How the params relate to the model and the other ranks (FSDP2: this rank's shards).
    sharding: Sharding = UNSHARDED
    #: The dtype the forward pass computes in, and fp16's loss scaling.
    precision: Precision = Precision()
    #: On a non-finite loss or gradient: "stop" (counted; the trainer stops, nothing of it is
    #: saved), "skip" (the update is masked out and counted) or "continue" (counted only).
    nan_policy: str = "stop"


class TrainState:
    """An immutable training state. Read entries as attributes; change them with `replace`.

    >>> state.step, state.params["0", "weight"]          # doctest: +SKIP
    >>> state = state.replace(step=state.step + 1)       # doctest: +SKIP
    """

    __slots__ = ("_entries", "_static", "_consumed")

    def __init__(self, entries: dict[str, Any], static: Static) -> None:
        missing = [k for k in ENTRIES if k not in entries]
        unknown = [k for k in entries if k not in ENTRIES + TRANSIENT]
        if missing or unknown:
            raise ValueError(f"TrainState entries: missing {missing}, unknown {unknown}")
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_static", static)
        object.__setattr__(self, "_consumed", None)

    def __getattr__(self, name: str) -> Any:
        if name in ENTRIES or name in TRANSIENT:
            self._check_live()
            return self._entries.get(name)
        raise AttributeError(f"TrainState has no entry {name!r}; entries are {ENTRIES}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"TrainState is immutable: cannot assign {name!r}. "
            f"Use `state = state.replace({name}=...)` instead."
        )

    __delattr__ = __setattr__

    def __repr__(self) -> str:
        if self._consumed is not None:
            return f"TrainState(<consumed at step {self._consumed[0]}>)"
        return f"TrainState(step={int(self._entries['step'])}, entries={list(ENTRIES)})"

    @property
    def static(self) -> Static:
        return self._static

    def replace(self, **changes: Any) -> TrainState:
        """A new state with the given entries swapped in (keyword-only, like flax)."""
        self._check_live()
        unknown = [k for k in changes if k not in ENTRIES + TRANSIENT]
        if unknown:
            raise AttributeError(f"TrainState has no entries {unknown}; entries are {ENTRIES}")
        return TrainState({**self._entries, **changes}, self._static)

    def tensors(self) -> TensorDict:
        """The saved entries as one TensorDict (shares storage with the state)."""
        self._check_live()
        return TensorDict({k: self._entries[k] for k in ENTRIES}, batch_size=[])

    def load(self, tensors: TensorDict, *, in_place: bool = False) -> TrainState:
        """A state with this one's static part and the entries of `tensors` (e.g. a snapshot).

        Structure, shapes and dtypes must match this state exactly; tensors are copied to
        this state's devices. `in_place`: into this state's own tensors, which the returned
        state shares (no second copy of the state; this one then holds the same values).
        """
        self.check_fits(tensors)
        tensors = with_added(tensors, self.tensors())  # an older snapshot: their step-0 values
        tensors = self._static.sharding.localize(tensors)  # e.g. this rank's rows of each shard
        mine = self._entries
        copy = _into if in_place else _like
        new = {k: copy(mine[k], _entry(tensors, k)) for k in ENTRIES if k != "metrics"}
        new["metrics"] = _metrics_like(mine["metrics"], tensors["metrics"])
        return TrainState(new, self._static)

    def with_metrics(self, metrics: TensorDict) -> TrainState:
        """This state with a snapshot's `metrics` (any keys a transform added), on this
        state's devices."""
        return self.replace(metrics=_metrics_like(self.metrics, metrics))

    def check_fits(self, tensors: TensorDict) -> None:
        """Raise ValueError naming where whole `tensors` (e.g. a snapshot's) differ from this
        state in keys, shapes or dtypes. A sharded state is compared by its whole shapes."""
        self._check_live()
        mine = self._static.sharding.global_meta(self.tensors())
        tensors = with_added(tensors, mine)
        # `metrics` holds the last step's values, whatever transforms put there: no structure
        problems = _structure_mismatches(mine.exclude("metrics"), tensors.exclude("metrics"))
        if problems:
            raise ValueError(
                "the snapshot does not fit this model and recipe: " + "; ".join(_few(problems))
            )

    @contextlib.contextmanager
    def bind(self) -> Iterator[nn.Module]:
        """The model with this state's params and buffers in place, for forward passes.

        Unsharded, they are swapped into the skeleton and swapped out on exit; sharded
        (FSDP2), the shards are copied into the sharded module, which gathers them.
        """
        self._check_live()
        model, sharding, frozen = self._static.model, self._static.sharding, self.frozen
        with (
            sharding.bind(model, self.params),
            sharding.bind(model, frozen) if _has_leaves(frozen) else contextlib.nullcontext(),
            swapped_into(self.buffers, model),
        ):
            yield model

    def state_dict(self, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The params (with `ema`, their moving average) and buffers keyed as the model's
        `state_dict()` is, for the plain `nn.Module`: `module.load_state_dict(...)`.

        The tensors are detached views of the state's (clone them to keep them past the
        next donating step). A sharded (FSDP2) state holds only this rank's rows: read a
        snapshot of it whole with `functrain.checkpoint.load` and use `load_into` instead.
        """
        self._check_live()
        if not isinstance(self._static.sharding, Unsharded):
            raise ValueError(
                "state_dict() of a sharded state would hold this rank's rows only: load a "
                "snapshot of it whole (functrain.checkpoint.load) and call load_into"
            )
        out = weights(self.tensors(), ema=ema)
        model = self._static.model
        alias = aliases(model)  # and the ties `to("meta")` undid in the skeleton:
        alias.update(tied_names(model))
        return {k: out[alias[k]] for k in state_dict_keys(model) if alias.get(k) in out}

    def clone(self) -> TrainState:
        """A deep copy of every entry (params keep `requires_grad`)."""
        self._check_live()
        return TrainState({k: _clone(v) for k, v in self._entries.items()}, self._static)

    def consume(self, *, failed: bool = False) -> None:
        """Mark this state as donated (`failed`: to a step that raised part-way): any later
        use raises `ConsumedStateError`."""
        object.__setattr__(self, "_consumed", (int(self._entries["step"]), failed))

    def _check_live(self) -> None:
        if self._consumed is None:
            return
        step, failed = self._consumed
        if failed:
            raise ConsumedStateError(
                f"this TrainState (step {step}) was donated to a step() that failed part-way: "
                "its buffers may hold half an update, so it is gone. Restore the last "
                "snapshot, or call step(state, batch, donate=False) where a step may fail, "
                "which leaves its input intact."
            )
        raise ConsumedStateError(
            f"this TrainState (step {step}) was donated to step() and its "
            "buffers now belong to the state step() returned. Use that state, or call "
            "step(state, batch, donate=False) to keep the input intact."
        )


def weights(tensors: TensorDict, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Params (or their EMA), frozen params and buffers of a state's `tensors()` (or a
    snapshot's), keyed as `model.state_dict()` is."""
    source = tensors["ema"] if ema else tensors["params"]
    if ema and not list(source.keys()):
        raise ValueError("the state has no EMA: its step has no functrain.steps.ema transform")
    out = {}
    for td in (source, _entry(tensors, "frozen"), tensors["buffers"]):
        for key, t in td.items(include_nested=True, leaves_only=True):
            out[key if isinstance(key, str) else ".".join(key)] = t.detach()
    return out


def _entry(tensors: TensorDict, name: str) -> TensorDict:
    """`tensors[name]`; an entry a snapshot of an older format lacks (`_ADDED_LATER`) is
    empty."""
    if name in _ADDED_LATER and name not in tensors.keys():  # noqa: SIM118 -- a TensorDict
        return TensorDict({}, batch_size=[])
    return tensors[name]


def missing_added(tensors: TensorDict, mine: TensorDict) -> list[tuple[str, str]]:
    """The `ADDED_LEAVES` this state has and `tensors` (an older snapshot's) lacks."""
    return [
        k for k in ADDED_LEAVES if mine.get(k, None) is not None and tensors.get(k, None) is None
    ]


def with_added(tensors: TensorDict, mine: TensorDict) -> TensorDict:
    """`tensors` with the `ADDED_LEAVES` it lacks at their step-0 values, shaped as `mine`'s
    (not changed in place)."""
    missing = missing_added(tensors, mine)
    if not missing:
        return tensors
    out = tensors.clone(recurse=False)
    for entry, name in missing:
        at_0 = torch.full_like(mine[entry, name], _ADDED_AT_0[name])
        out[entry] = out[entry].clone(recurse=False).set(name, at_0)
    return out


@torch.no_grad()
def reset_added(mine: TensorDict, missing: list[tuple[str, str]]) -> None:
    """Set the `missing` `ADDED_LEAVES` of a state's tensors to their step-0 values, in place
    (what a snapshot that lacks them is read into)."""
    for entry, name in missing:
        mine[entry, name].fill_(_ADDED_AT_0[name])


def _has_leaves(td: TensorDict) -> bool:
    return next(iter(td.keys(True, True)), None) is not None


def tied_names(model: nn.Module) -> dict[str, str]:
    """Of a model `create` took over: each other name of a tied weight -> the name the state
    keeps it under (`head.weight` -> `emb.weight`)."""
    if "_functrain_tied" not in model.__dict__:  # sharded in place (FSDP): still tied
        params = dict(model.named_parameters())
        return {k: v for k, v in aliases(model).items() if k != v and v in params}
    tied = model.__dict__["_functrain_tied"]
    return {".".join(alias): ".".join(first) for alias, first in tied}


def state_dict_keys(model: nn.Module) -> list[str]:
    """The keys of `model.state_dict()`, in its order, without calling it: each module's
    params, then its persistent buffers, modules in `named_modules` order."""
    keys = []
    for prefix, m in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        keys += [dot + k for k, v in m._parameters.items() if v is not None]
        skip = m._non_persistent_buffers_set
        keys += [dot + k for k, v in m._buffers.items() if v is not None and k not in skip]
    return keys


def load_into(
    module: nn.Module, source: TrainState | TensorDict, *, ema: bool = False
) -> nn.Module:
    """Copy a state's (or a snapshot's, `functrain.checkpoint.load(path)[0]`) params (or
    EMA) and buffers into the plain `module`, strictly by name (non-persistent buffers,
    which `module.state_dict()` leaves out, are left as they are); return the module."""
    tensors = source.tensors() if isinstance(source, TrainState) else source
    if isinstance(source, TrainState) and not isinstance(source.static.sharding, Unsharded):
        raise ValueError("load_into needs the whole state: load a snapshot of it instead")
    found = weights(tensors, ema=ema)
    alias = aliases(module)
    module.load_state_dict(
        {k: found[alias[k]] for k in state_dict_keys(module) if alias.get(k) in found}
    )  # strict: a key the source lacks is named by torch
    return module


def _clone(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value.apply(lambda t: t.detach().clone().requires_grad_(t.requires_grad))


def _like(mine: Any, theirs: Any) -> Any:
    """`theirs` copied onto the devices, dtypes and requires_grad of `mine`."""
    if isinstance(mine, torch.Tensor):
        return theirs.to(mine.device, copy=True).requires_grad_(mine.requires_grad)
    return mine.apply(
        lambda m, t: t.to(m.device, copy=True).requires_grad_(m.requires_grad), theirs
    )


@torch.no_grad()
def _into(mine: Any, theirs: Any) -> Any:
    """`theirs` copied into `mine`'s own tensors (their devices, dtypes, requires_grad)."""
    if isinstance(mine, torch.Tensor):
        return mine.copy_(theirs)
    return mine.apply(lambda m, t: m.copy_(t), theirs)


def _metrics_like(mine: TensorDict, theirs: TensorDict) -> TensorDict:
    """A snapshot's `metrics` (any keys a transform added) on this state's devices: a key
    this state has keeps its device, a new one takes the loss's."""
    found = dict(theirs.items(include_nested=True, leaves_only=True))
    order = [k for k in mine.keys(True, True) if k in found] + [
        k for k in found if mine.get(k, None) is None
    ]  # this state's keys in its order (a loop may zip leaves), then the snapshot's others
    out = {}
    for key in order:
        ref = mine.get(key, None)
        device = ref.device if ref is not None else mine["loss"].device
        out[key if isinstance(key, str) else ".".join(key)] = found[key].to(device, copy=True)
    return TensorDict(out, batch_size=[]).unflatten_keys(".")


def _few(problems: list[str]) -> list[str]:
    """The first few problems of each kind (missing, unexpected, other shape or dtype)."""
    kinds: dict[str, list[str]] = {}
    for p in problems:
        kind = p.split(" ", 1)[0] if p.startswith(("missing ", "unexpected ")) else "changed"
        kinds.setdefault(kind, []).append(p)
    out = []
    for items in kinds.values():
        out += items[:_SHOWN]
        if len(items) > _SHOWN:
            out.append(f"and {len(items) - _SHOWN} more like it")
    return out


def _structure_mismatches(mine: TensorDict, theirs: TensorDict) -> list[str]:
    ours = dict(mine.items(include_nested=True, leaves_only=True))
    other = dict(theirs.items(include_nested=True, leaves_only=True))
    moved = _trainability_changes(ours.keys() - other.keys(), other.keys() - ours.keys())
    problems = [f"missing {'/'.join(k)}" for k in ours if k not in other and k not in moved]
    problems += [f"unexpected {'/'.join(k)}" for k in other if k not in ours and k not in moved]
    problems += sorted(set(moved.values()))
    for k in ours.keys() & other.keys():
        a, b = ours[k], other[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(
                f"{'/'.join(k)} is {b.dtype} {list(b.shape)}, expected {a.dtype} {list(a.shape)}"
            )
    return sorted(problems)


def _split_frozen(
    params: TensorDict, names: list[tuple[str, ...]]
) -> tuple[TensorDict, TensorDict]:
    """(trainable, frozen): the params named in `names` move to a tree of their own, with no
    `requires_grad`."""
    if not names:
        return params, TensorDict({}, batch_size=[])
    if len(names) == len(list(params.keys(include_nested=True, leaves_only=True))):
        raise ConfigError(
            "every parameter of the model is frozen (requires_grad=False, or matched by the "
            "recipe's freeze:): there is nothing to train"
        )
    frozen = params.select(*names).apply(lambda t: t.detach().requires_grad_(False))
    return params.exclude(*names), frozen


def _trainability_changes(missing: set, unexpected: set) -> dict[tuple, str]:
    """Keys of params that are trainable on one side and frozen on the other (each of the
    pair -> the one problem that names it)."""
    out = {}
    for key in missing:
        entry, rest = key[0], key[1:]
        other = {"params": "frozen", "frozen": "params"}.get(entry)
        if other and (other, *rest) in unexpected:
            name, now = ".".join(rest), "trainable" if entry == "params" else "frozen"
            was = "frozen" if now == "trainable" else "trainable"
            problem = (
                f"param {name} is {now} now but {was} in the snapshot (which params are "
                "trainable is part of the state: keep the freeze: list and requires_grad)"
            )
            out[key] = out[(other, *rest)] = problem
    return out


def create(
    model: nn.Module,
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: Optimizer,
    transforms: Sequence[Transform | Callable[[TrainState, Any], TrainState]],
    schedule: Schedule | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    placement: Placement | None = None,
    sharding: Sharding | None = None,
    precision: Precision | str = "fp32",
    nan_policy: str = "stop",
) -> TrainState:
    """The state at step 0: params and buffers taken from `model`, optimizer state, key.

    Parameters with `requires_grad=False` are frozen: they go to the state's `frozen` entry
    and get no gradient, no optimizer state, no weight decay and no reduction; their bits
    never change. The model becomes the skeleton: its own tensors move to the meta device (no memory),
    and the state's tensors are swapped in for each forward pass. So `create` takes the
    module over: a forward pass or `state_dict()` on it outside `state.bind()` raises,
    saying so; get the weights with `state.state_dict()` or `functrain.load_into(fresh,
    state)`. With a `sharding` (e.g.
    FSDP2's, `functrain.distributed.fsdp.Sharding.of(model)`) the model keeps its shards instead,
    and the state holds copies. `placement` is this process's rank in the job.
    `precision` is `"fp32"`, `"bf16"`, `"fp16"` or a `functrain.precision.Precision`
    (fp16's loss scale then lives in `state.stats`). `nan_policy` says what a step whose
    loss or gradients are not finite does: every policy counts such steps in
    `state.stats["nonfinite_steps"]` and keeps the first in `stats["first_nonfinite"]`;
    "skip" also leaves params and optimizer state as they were; "stop" (the default) lets
    the trainer and `Snapshots` refuse to go on or save once one happened.
    """
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}"
        )
    if isinstance(precision, str):
        precision = Precision(precision)
    if sharding is None and any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise ValueError(
            "the model's params are sharded DTensors: pass "
            "sharding=functrain.distributed.fsdp.Sharding.of(model) to create()"
        )
    sharding = sharding or UNSHARDED
    frozen_names = [tuple(k.split(".")) for k, p in model.named_parameters() if not p.requires_grad]
    params, buffers = sharding.split(model, device)
    params, frozen = _split_frozen(params, frozen_names)
    model.train()
    transform = compose(*transforms)
    static = Static(
        model=model,
        loss=loss,
        optimizer=optimizer,
        schedule=schedule or constant(),
        transform=transform,
        placement=placement or Placement(),
        sharding=sharding,
        precision=precision,
        nan_policy=nan_policy,
    )
    metric = torch.full((), float("nan"), device=device)
    entries = {
        "step": torch.zeros((), dtype=torch.int64),
        "params": params,
        "frozen": frozen,
        "buffers": buffers,
        "opt": optimizer.init(params),
        "rng": rng.key(seed),
        "data": TensorDict({"samples": torch.zeros((), dtype=torch.int64)}, batch_size=[]),
        "stats": TensorDict(
            {
                "loss_ema": metric.clone(),
                "best_eval": torch.full((), float("inf"), device=device),
                "nonfinite_steps": torch.zeros((), dtype=torch.int64, device=device),
                "first_nonfinite": torch.full((), -1, dtype=torch.int64, device=device),
                **precision.init_stats(device),
            },
            batch_size=[],
        ),
        "ema": TensorDict({}, batch_size=[]),
        "metrics": TensorDict(
            {
                "loss": metric.clone(),
                "grad_norm": metric.clone(),
                # float64 on the CPU (any device, mps too): the LR as the optimizer used it
                "lr": torch.full((), float("nan"), dtype=torch.float64),
            },
            [],
        ),
    }
    return transform.init(TrainState(entries, static))  # e.g. EMA starts from the params
