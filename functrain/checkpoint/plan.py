"""The one resume plan: does a snapshot fit the run that wants to continue from it?

A run is described by the manifest entries it writes into every snapshot (`describe`:
recipe, data fingerprint, device, world size, CPU threads, determinism, init source).
Resuming compares the snapshot's description with the description of the run now:

    structure      keys, shapes, dtypes of every entry             refused (`like` given)
    recipe         every key but the free ones (FREE_KEYS)         refused unless allowed
    data           the data fingerprint, field by field            refused
    init_from      the weights the run started from                refused
    world size     other process count, unless bits cannot change  warned: what still holds
    environment    torch / functrain / Python versions, device,    warned
                   CPU threads

The CLI's `resume`, `Snapshots.restore` and `functrain check` (through the CLI) all decide
here. What `now` does not describe is not compared: a custom loop that records no recipe
is checked on what it does record.

>>> plan = plan_resume(path, manifest, describe(recipe=r, data=fp), allow=["optim.lr"])  # doctest: +SKIP
>>> plan.allowed, plan.warnings                                                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson
import torch
from tensordict import TensorDict
from torch.distributed.tensor import DTensor

from functrain import names
from functrain.checkpoint import dcp
from functrain.checkpoint.manifest import versions
from functrain.checkpoint.pretrained import content_hash
from functrain.data import fingerprint_changes
from functrain.determinism import promised
from functrain.errors import MismatchError
from functrain.hashing import ABSENT, canonical_hash, diff
from functrain.parallel import Unsharded
from functrain.state import TrainState, weights

__all__ = [
    "FREE_KEYS",
    "Plan",
    "describe",
    "environment",
    "plan_resume",
    "with_frozen_of",
    "without_frozen",
]

#: Recipe keys that change no bit of training: they may differ on resume without --allow-change.
FREE_KEYS = (
    "name", "out_dir", "checkpoint", "log_every", "log", "data.num_workers", "data.replay",
    "init_from",  # its path may move: the content hash in the manifest is what is compared
    "auto_resume",
)  # fmt: skip

#: The manifest entries `plan_resume` compares (or warns of), by its own rules.
KNOWN_META = (
    "recipe", "recipe_hash", "data", "device", "cpu_threads", "determinism", "init_from",
    "tied", "frozen_sha256", "world_size", "world_size_exact", "versions", "run_id",
)  # fmt: skip

#: torch's intra-op threads split CPU reductions (a bias's gradient, a norm) into as many
#: partial sums, so their count is part of what a CPU run's bits depend on. torchrun sets
#: OMP_NUM_THREADS=1 for several processes per node, a plain process uses every core.
THREADS = "CPU threads (OMP_NUM_THREADS)"


def describe(
    *,
    recipe: Mapping | None = None,
    data: Mapping | None = None,
    device: str | None = None,
    world_size: int = 1,
    world_size_exact: bool = False,
    determinism: Mapping | None = None,
    init_from: Mapping | None = None,
    tied: Mapping[str, str] | None = None,
    frozen_sha256: str | None = None,
) -> dict[str, Any]:
    """The manifest entries that say what a run is: written into each of its snapshots
    (with `versions`, which the manifest always has), compared by `plan_resume`.

    `world_size_exact`: the run's bits do not depend on its number of processes
    (canonical micro-batches, with ddp or fsdp). `init_from`: the source and content hash of the
    weights it started from. `frozen_sha256`: the content hash of the frozen params, which
    a `trainable_only` snapshot leaves out. `tied`: the other names of tied weights (`lm_head.weight` ->
    `transformer.wte.weight`), which the state keeps once and an export writes under each."""
    out: dict[str, Any] = {}
    if recipe is not None:
        out["recipe"] = dict(recipe)
        out["recipe_hash"] = canonical_hash(dict(recipe))
    if data is not None:
        out["data"] = dict(data)
    if device is not None:
        out["device"] = device
        out["cpu_threads"] = torch.get_num_threads()
    if determinism is not None:
        out["determinism"] = dict(determinism)
    if init_from is not None:
        out["init_from"] = dict(init_from)
    if tied:
        out["tied"] = dict(tied)
    if frozen_sha256 is not None:
        out["frozen_sha256"] = frozen_sha256
    out["world_size"] = world_size
    out["world_size_exact"] = world_size_exact
    return out


@attrs.frozen(kw_only=True)
class Plan:
    """A snapshot that fits: what to load, and what differs but was allowed or warned of."""

    snapshot: Path
    step: int
    allowed: list[str]  # recipe changes accepted ("key: old -> new"), recorded in lineage
    warnings: list[str]  # what may make the bits differ from an unbroken run

    @property
    def bitwise(self) -> bool:
        """Whether the resumed run is promised the bits of an unbroken one (no warning)."""
        return not self.warnings


def plan_resume(
    snapshot: str | Path,
    manifest: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    allow: Iterable[str] = (),
    like: TrainState | None = None,
    tensors: TensorDict | None = None,
) -> Plan:
    """Decide whether `snapshot` (its `manifest`) fits the run described by `now` (what
    `describe` gives), or raise a MismatchError naming what does not, before anything is
    loaded. `allow`: recipe keys (or prefixes) whose change is accepted. `like`: a state
    of this run, whose structure the snapshot's `tensors` (or, for a sharded snapshot, the
    shapes its manifest lists) must match."""
    path = Path(snapshot)
    if manifest.get("trainable_only") and "frozen_sha256" not in now and like is not None:
        now = {**now, "frozen_sha256": frozen_hash(like)}  # the frozen params it would take
    if like is not None:
        _check_structure(path, manifest, like, tensors)
    allow = list(allow)
    allowed = _check_recipe(manifest, now, allow) + _check_data(manifest, now, allow)
    _check_init(manifest, now)
    _check_frozen(path, manifest, now)
    warnings = _world_size(path, manifest, now) + _environment(manifest, now)
    if not promised(manifest.get("determinism")):
        mode = manifest["determinism"]["mode"]
        warnings.append(
            f"{path} was trained with determinism: {mode}: nondeterministic kernels were "
            "allowed, so the resumed run is not promised the bits of an unbroken one"
        )
    return Plan(snapshot=path, step=int(manifest["step"]), allowed=allowed, warnings=warnings)


def _check_structure(
    path: Path, manifest: Mapping, like: TrainState, tensors: TensorDict | None
) -> None:
    theirs = tensors if tensors is not None else skeleton(manifest, like)
    try:
        like.check_fits(theirs)
    except ValueError as err:
        raise MismatchError(
            f"{path}: {err}. Resume with the recipe the run was trained with.", what="structure"
        ) from err


def _is_under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


#: Recipe keys added after snapshots were first written, with the value that does what a
#: recipe without them did: an older manifest's recipe is read with these filled in.
ADDED_KEYS = {
    "init_from": None, "init_from_map": {}, "freeze": [], "metrics": [], "nan_policy": "stop",
    "determinism": "strict", "tf32": False, "bucket_mb": 0.0,
}  # fmt: skip


def _check_recipe(manifest: Mapping, now: Mapping, allow: list[str]) -> list[str]:
    if "recipe" not in now:
        return []
    if "recipe" not in manifest:
        raise MismatchError(
            "the snapshot records no recipe (a loop of your own wrote it), so the recipe "
            "cannot be checked against it: resume it from that loop (Snapshots.restore), or "
            "start a new run",
            what="recipe",
        )
    theirs = {**ADDED_KEYS, **names.current_plain(manifest["recipe"])}  # moved paths: no change
    ours = {**ADDED_KEYS, **now["recipe"]}  # a recipe of a loop of its own may lack them too
    changes = [c for c in diff(theirs, ours) if not _is_under(c[0], FREE_KEYS)]
    refused = [
        c for c in changes if not _is_under(c[0], allow) and not _same_bits(c[0], manifest, now)
    ]
    if refused:
        problems = "\n".join(f"  {k}: {_show(old)} -> {_show(new)}" for k, old, new in refused)
        raise MismatchError(
            "the recipe differs from the snapshot's, which would break exact resume:\n"
            f"{problems}\nRestore those values, or accept each change with --allow-change KEY "
            f"(e.g. --allow-change {refused[0][0]}).",
            what="recipe",
        )
    return [f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in changes]


def _same_bits(key: str, manifest: Mapping, now: Mapping) -> bool:
    """Whether a change of `key` keeps every bit of this resume: `bucket_mb` (how the
    gradient reduction is cut while it overlaps backward) does when the run is canonical
    (its tree adds the same values however they are bucketed) or neither run has more than
    2 processes (an all-reduce of two values is one addition)."""
    if key != "bucket_mb":
        return False
    sizes = (manifest.get("world_size", 1), now.get("world_size", 1))
    return bool(now.get("world_size_exact")) or max(sizes) <= 2


#: Which recipe key changes each field of a data fingerprint (`functrain.data.fingerprint`);
#: the sample order's version is no recipe key, and never allowed to change.
_DATA_KEYS = {
    "size": "data.dataset", "content": "data.dataset", "batch_size": "data.batch_size",
    "shuffle": "data.shuffle", "seed": "seed",
}  # fmt: skip


def _check_data(manifest: Mapping, now: Mapping, allow: list[str]) -> list[str]:
    """Refuse other data, unless each changed fingerprint field follows a recipe change that
    `allow` accepts (`data`, `data.dataset`, `data.dataset.path`, `data.batch_size`, ...):
    returns those, as `data: what changed`."""
    if "data" not in now:
        return []
    if "data" not in manifest:
        raise MismatchError(
            "the snapshot records no data fingerprint, so its data cannot be checked; "
            "resume it without one (a loop of your own), or start a new run",
            what="data",
        )
    old, new = manifest["data"], dict(now["data"])
    refused, allowed = [], []
    for field in sorted(set(old) | set(new)):
        change = fingerprint_changes({field: old.get(field)}, {field: new.get(field)})
        if not change:
            continue
        key = _DATA_KEYS.get(field)
        ok = key is not None and (_is_under(key, allow) or any(_is_under(a, [key]) for a in allow))
        (allowed if ok else refused).append((field, change[0]))
    if refused:
        keys = sorted({_DATA_KEYS[f] for f, _ in refused if f in _DATA_KEYS})
        branch = (
            ", or, to go on with other data (a fine-tuning branch), accept the change with "
            + " ".join(f"--allow-change {k}" for k in keys)
            if keys
            else ""
        )
        raise MismatchError(
            "the training data differs from the snapshot's:\n  "
            + "\n  ".join(text for _, text in refused)
            + f"\nResume with the data the run was trained on (data.dataset in the recipe){branch}.",
            what="data",
        )
    return [f"data: {text}" for _, text in allowed]


def _check_init(manifest: Mapping, now: Mapping) -> None:
    theirs, ours = manifest.get("init_from"), now.get("init_from")
    if theirs is None and ours is None:
        return
    if (theirs or {}).get("sha256") != (ours or {}).get("sha256"):
        was, now_ = _init_source(theirs), _init_source(ours)
        raise MismatchError(
            f"the weights the run started from differ: the snapshot's init_from is {was}, "
            f"this run's {now_}. Resume with the init_from the run started from, unchanged.",
            what="init_from",
        )


def _check_frozen(path: Path, manifest: Mapping, now: Mapping) -> None:
    """A snapshot without its frozen params takes this run's: they must be the same bytes."""
    if not manifest.get("trainable_only"):
        return
    if now.get("frozen_sha256") != manifest.get("frozen_sha256"):
        raise MismatchError(
            f"{path} holds the trainable params only (checkpoint.trainable_only), and the "
            "frozen params this recipe builds (from init_from) are not the ones it was "
            "trained on (their sha256 differs). Resume with the same init_from.",
            what="init_from",
        )


def frozen_hash(state: TrainState) -> str:
    """The content hash of a state's frozen params (what `trainable_only` leaves out), over
    their whole tensors: the same on any world size. Under FSDP each is gathered in turn, so
    every rank must call it."""
    views = state.static.sharding.views(state.tensors().select("frozen"))
    return content_hash(_Whole({k.split("/", 1)[1].replace("/", "."): v for k, v in views.items()}))


class _Whole(Mapping[str, torch.Tensor]):
    """Views of whole tensors, each gathered only when read (one whole param at a time)."""

    def __init__(self, views: dict[str, torch.Tensor]) -> None:
        self._views = views

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._views[key]
        return t.full_tensor() if isinstance(t, DTensor) else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


def skeleton(manifest: Mapping[str, Any], like: TrainState) -> TensorDict:
    """Meta tensors shaped as a sharded snapshot's manifest lists them; a `trainable_only`
    one's frozen params are `like`'s (which `_check_frozen` compares by hash)."""
    theirs = dcp.skeleton(dict(manifest))
    if not manifest.get("trainable_only"):
        return theirs
    mine = like.static.sharding.global_meta(like.tensors())
    return theirs.exclude("frozen").set("frozen", mine["frozen"])


def without_frozen(tensors: TensorDict) -> TensorDict:
    """A state's entries with `frozen` empty: what a `trainable_only` snapshot holds."""
    return tensors.exclude("frozen").set("frozen", TensorDict({}, batch_size=[]))


def with_frozen_of(
    like: TrainState, manifest: Mapping, tensors: TensorDict | None
) -> TensorDict | None:
    """A `trainable_only` snapshot's `tensors` completed with `like`'s frozen params (the
    plan checks they are the ones it was trained on); any other snapshot's as they are.
    Whole `tensors` (an unsharded snapshot) under FSDP get them whole, each gathered from
    the ranks' shards, so every rank must call it."""
    if tensors is None or not manifest.get("trainable_only"):
        return tensors
    frozen = like.frozen
    names = manifest.get("frozen_names")  # what was frozen when it was written
    if isinstance(names, list) and isinstance(like.static.sharding, Unsharded):
        # those names, from wherever they are now: a param trainable now is then named by
        # the structure check as frozen in the snapshot, not as a bare "missing"
        ours = weights(like.tensors())  # every param by its state_dict name
        frozen = TensorDict({}, batch_size=[])
        for name in names:
            if isinstance(name, str) and name in ours:
                frozen.set(tuple(name.split(".")), ours[name])
    elif not isinstance(like.static.sharding, Unsharded):  # whole tensors: ours gathered whole
        views = like.static.sharding.views(like.tensors().select("frozen"))
        whole = _Whole(views)  # one param at a time, a collective each: every rank calls
        frozen = TensorDict({}, batch_size=[])
        for key in views:
            frozen.set(tuple(key.split("/")[1:]), whole[key])
    return tensors.exclude("frozen").set("frozen", frozen)


def _init_source(init: Mapping | None) -> str:
    if not init:
        return "none"
    return f"{init.get('path', '?')} (sha256 {str(init.get('sha256'))[:12]}...)"


def _world_size(path: Path, manifest: Mapping, now: Mapping) -> list[str]:
    wrote, running = manifest.get("world_size", 1), now.get("world_size", 1)
    if wrote == running or now.get("world_size_exact"):
        return []
    return [
        f"{path} was written by {wrote} process(es), this run has {running}: the samples "
        "and LR of every step stay the same, but params will be close to, not bitwise equal "
        "to, an unbroken run (gradients are reduced in another order and dropout masks are "
        "drawn per rank, or parallel: fsdp reduces in its own order; give forward_backward "
        "a micro_batch_size, with parallel: ddp or fsdp, for bits that do not depend on the "
        "world size)"
    ]


def environment(device: str | None = None) -> dict[str, Any]:
    """This process's versions, device and CPU threads, in the terms `_environment` uses."""
    v = versions()
    found = {
        "torch version": v["torch"],
        "functrain version": v["functrain"],
        "python version": v["python"],
    }
    if device is not None:
        found["device"] = device
    found[THREADS] = torch.get_num_threads()
    return found


def _environment(manifest: Mapping, now: Mapping) -> list[str]:
    v = manifest.get("versions", {})
    theirs = {
        "torch version": v.get("torch"),
        "functrain version": v.get("functrain"),
        "python version": v.get("python"),
    }
    if "device" in now:
        theirs["device"] = manifest.get("device")
    if manifest.get("device") == "cpu" and now.get("device") == "cpu" and "cpu_threads" in manifest:
        theirs[THREADS] = manifest["cpu_threads"]
    ours = environment(now.get("device"))
    return [
        f"{what} differs: snapshot {value} vs now {ours[what]}; results may not be bitwise "
        "identical to an unbroken run"
        + (f" (run with OMP_NUM_THREADS={value} for the same bits)" if what == THREADS else "")
        for what, value in theirs.items()
        if value != ours[what]
    ]


def _show(value: Any) -> str:
    if isinstance(value, str) or value is ABSENT:
        return str(value)
    return orjson.dumps(value, default=repr).decode()
