"""`functrain resume`: find the snapshot, check it through the one resume plan
(`functrain.checkpoint.plan`: structure, recipe, data, init source, world size, software),
read it into the state a trial step has just spent, and prepare the run directory — all before a step runs.

Every check runs on every rank before anything is written, so a refusal leaves the run
directory as it was and stops all ranks alike.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from functrain import checkpoint
from functrain import data as data_lib
from functrain.checkpoint import Snapshots, plan_resume
from functrain.checkpoint.plan import with_frozen_of
from functrain.distributed import Context
from functrain.errors import RunError
from functrain.hashing import canonical_hash
from functrain.recipe import Recipe
from functrain.run import rundir
from functrain.run.build import Built, build_and_probe, check_world_size, sharded
from functrain.state import TrainState

__all__ = ["NothingToDo", "Resumed", "prepare"]


@attrs.frozen(kw_only=True)
class Resumed:
    """What a resume hands the trainer."""

    built: Built
    state: TrainState
    run_dir: Path
    snapshot: Path
    meta: dict  # manifest entries of every later snapshot: parent, allowed changes, lineage
    data_restored: bool  # a stateful iterable stands at the cursor already (nothing to skip)
    owner: rundir.RunLock | None  # rank 0's hold on run_dir, to release when the run ends


def prepare(
    ctx: Context,
    recipe: Recipe,
    source: str,
    *,
    name: str | None,
    allow: list[str],
    until: int | None = None,
) -> Resumed:
    """Resume the run of `recipe` from `source` (latest | state_<step> | a path): into the
    same run directory, or branched into a new one called `name`. `until` (a step to stop
    after) must lie past the snapshot's step."""
    source_run = rundir.run_path(recipe)
    if name:
        recipe = attrs.evolve(recipe, name=name)
    target = rundir.run_path(recipe)
    ctx.all_ok(lambda: check_world_size(recipe, ctx.world_size))  # before any snapshot is read
    # Own the directory first (rank 0): no other run may write snapshots while we choose.
    owner = ctx.all_ok(lambda: rundir.lock_run(target) if ctx.is_main and target.is_dir() else None)
    try:
        rundir.check_shared(ctx, target, owner)  # before any rank reads a snapshot of it
        return _prepare(ctx, recipe, source, source_run, target, owner, allow=allow, until=until)
    except BaseException:
        if owner is not None:
            owner.release()
        raise


def _prepare(
    ctx: Context,
    recipe: Recipe,
    source: str,
    source_run: Path,
    target: Path,
    owner: rundir.RunLock | None,
    *,
    allow: list[str],
    until: int | None,
) -> Resumed:
    is_sharded = sharded(recipe, ctx.world_size)
    # Checked now (every checksum), read after the trial step: the snapshot's tensors and
    # the trial's gradients are never in memory together.
    snap, (_, manifest) = ctx.all_ok(
        lambda: Snapshots(source_run, context=ctx).find(
            source, lambda s: Snapshots.read(s, sharded=is_sharded, ranks=ctx, tensors=False)
        )
    )
    ctx.agree("snapshot (step, manifest digest)", (manifest["step"], canonical_hash(manifest)))
    built = build_and_probe(recipe, ctx, resuming=True)
    tensors = None  # read later, into the state: each rank its rows of a sharded snapshot,
    # or the whole of an unsharded one straight into its tensors
    dcp_layout = manifest.get("layout") == "dcp"
    if is_sharded != dcp_layout or manifest.get("trainable_only"):  # whole, then copied
        tensors, _ = ctx.all_ok(lambda: Snapshots.read(snap, sharded=is_sharded, ranks=ctx))
    ctx.agree("data fingerprint", canonical_hash(built.fingerprint))
    tensors = with_frozen_of(built.state, manifest, tensors)  # trainable_only: ours, checked
    plan = plan_resume(
        snap, manifest, built.description, allow=allow, like=built.state, tensors=tensors
    )
    for warning in plan.warnings:
        ctx.warn(warning)
    step = plan.step
    _nothing_to_do(snap, step, recipe)
    if until is not None and not step < until <= recipe.steps:
        raise RunError(
            f"--until {until}: give a step after the snapshot's ({step}) and at most the "
            f"recipe's steps ({recipe.steps}); to train longer, change steps"
        )
    branching = target.resolve() != snap.parent.resolve()
    newer = _newer_snapshots(target, snap, step, source) if not branching else []
    # into the state the trial step spent: one state in memory, every entry overwritten
    state = ctx.all_ok(  # reads files on every rank: a failure on one stops all alike
        lambda: Snapshots.place(snap, tensors, manifest, built.state, in_place=True)
    )
    tensors = None  # read from the file: gone once placed
    ctx.agree("loaded step", int(state.step))
    r = recipe.data
    samples = int(state.data["samples"])

    def place_data() -> bool:  # a plain iterable cannot restart at the cursor: refuse early
        placed = data_lib.restore(built.train, manifest.get("data_state"), samples, replay=r.replay)
        data_lib.check_start(
            built.train, samples, replay=r.replay, num_workers=r.num_workers, restored=placed
        )
        return placed

    data_restored = ctx.all_ok(place_data)
    owner = ctx.all_ok(
        lambda: _prepare_target(ctx, recipe, target, snap, step, newer, branching, owner)
    )
    event = {  # one per resume, kept by every later snapshot: `functrain inspect` shows them
        "kind": "branch" if branching else "resume",
        "step": step,
        "from": str(snap.resolve()),
        "world_size": [manifest.get("world_size", 1), ctx.world_size],
        "changes": plan.allowed,
    }
    meta = {
        **({} if branching or "run_id" not in manifest else {"run_id": manifest["run_id"]}),
        "parent": str(snap.resolve()) if branching else manifest.get("parent"),
        "allowed_changes": list(manifest.get("allowed_changes", [])) + plan.allowed,
        "lineage": list(manifest.get("lineage", [])) + [event],
    }
    return Resumed(
        built=built,
        state=state,
        run_dir=target,
        snapshot=snap,
        meta=meta,
        data_restored=data_restored,
        owner=owner,
    )


class NothingToDo(RunError):
    """The snapshot is at the recipe's last step already (the run finished)."""


def _nothing_to_do(snap: Path, step: int, recipe: Recipe) -> None:
    if step >= recipe.steps:
        raise NothingToDo(
            f"snapshot {snap} is at step {step} and the recipe trains {recipe.steps} steps: "
            "nothing to do. To train longer, pass steps=N with --allow-change steps "
            "--allow-change schedule (the schedule's length follows steps)."
        )


def _newer_snapshots(target: Path, snap: Path, step: int, source: str) -> list[Path]:
    """Snapshots of `target` past `step`: those `--from latest` skipped as invalid, to be set
    aside; resuming from an older valid snapshot by name would overwrite history."""
    newer = [p for s, p in checkpoint.list_snapshots(target, published=False) if s > step]
    if newer and source != "latest":
        raise RunError(
            f"{snap} is not the newest snapshot of {target} "
            f"({newer[-1].name} is). Resuming in place would overwrite "
            "the later history. Branch into a new run with --name NEW, or resume with "
            "--from latest."
        )
    return newer


def _prepare_target(
    ctx: Context,
    recipe: Recipe,
    target: Path,
    snap: Path,
    step: int,
    newer: list[Path],
    branching: bool,
    owner: rundir.RunLock | None,
) -> rundir.RunLock | None:
    """Rank 0 tidies the run directory it will write to (a failure stops every rank alike)
    and returns its hold on it (a branch makes the directory, and owns it from then on)."""
    if not ctx.is_main:
        return None
    for p in rundir.clean_partial(target):
        ctx.warn(f"removed {p}, left over by an interrupted write")
    for p in newer:
        ctx.warn(f"set aside invalid snapshot {p} as {rundir.set_aside(p).name}")
    if branching:
        metrics = rundir.metrics_until(snap.parent / rundir.METRICS_FILE, step)
        return rundir.create_run(recipe, target, metrics=metrics, held=owner)
    rundir.cut_metrics(target / rundir.METRICS_FILE, step)
    return owner
