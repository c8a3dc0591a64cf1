"""`functrain run | resume | inspect`: parse, build, loop, close.

User errors (bad recipe, missing or corrupt snapshot, changed recipe or data) end with one
paragraph on stderr and exit status 2, never a traceback, and leave run directories as
they were: every check runs before anything is written. A run stopped by SIGTERM, a first
Ctrl-C or `checkpoint.signal` writes a snapshot and exits 143; a second Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import sys
import warnings
from pathlib import Path

import attrs
import orjson

from functrain import checkpoint, dcp, dist, preempt, runs
from functrain.async_save import AsyncWriter
from functrain.build import BuildError, Built, build, probe, sharded, train_loader
from functrain.data import DataError, make_loader
from functrain.loop import Progress, append_metrics, evaluate, train
from functrain.recipe import RecipeError, load_recipe, recipe_hash, to_dict
from functrain.runs import RunError

USER_ERRORS = (RecipeError, RunError, BuildError, DataError, checkpoint.SnapshotError)
EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3  # under torchrun: another rank died or timed out


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if dist.env_rank() == 0:  # under torchrun every rank fails alike; one says why
            print(f"functrain {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"functrain {args.command}: interrupted", file=sys.stderr)
        return preempt.EXIT_ABORTED
    except RuntimeError as err:
        explained = dist.peer_failure(err)
        if explained is None:
            raise
        print(
            f"functrain {args.command}: error on rank {dist.env_rank()}: {explained}",
            file=sys.stderr,
        )
        return EXIT_PEER_LOST
    finally:
        dist.close()


def _parse(argv: list[str]) -> argparse.Namespace:
    """`functrain COMMAND ...`; options may come before or after the `key=value` overrides."""
    commands = _commands()
    top = argparse.ArgumentParser(prog="functrain", description=__doc__.splitlines()[0])
    top.add_argument(
        "command",
        choices=commands,
        help="; ".join(f"{k}: {v.description}" for k, v in commands.items()),
    )
    head = top.parse_args(argv[:1])
    sub = commands[head.command]
    args, extra = sub.parse_known_args(argv[1:])
    stray = [
        a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")
    ]
    if stray:
        sub.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    args.command = head.command
    return args


def _commands() -> dict[str, argparse.ArgumentParser]:
    def command(name: str, description: str, func) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"functrain {name}", description=description)
        p.set_defaults(func=func)
        return p

    run = command("run", "start a run from a recipe", cmd_run)
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")

    res = command("resume", "continue a run exactly from a snapshot", cmd_resume)
    res.add_argument("recipe", help="path to the run's recipe YAML file")
    res.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    res.add_argument("--from", dest="source", required=True, metavar="state_N|latest|PATH")
    res.add_argument("--name", help="branch into a new run directory with this name")
    res.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="accept a recipe change (a dotted key or prefix); repeatable",
    )

    ins = command(
        "inspect", "show a snapshot's manifest and digests, or a run's snapshots", cmd_inspect
    )
    ins.add_argument("path", help="a snapshot directory or a run directory")
    ins.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return {"run": run, "resume": res, "inspect": ins}


def cmd_run(args: argparse.Namespace) -> int:
    ctx = dist.init()
    recipe = ctx.all_ok(lambda: load_recipe(args.recipe, args.overrides))
    path = runs.run_path(recipe)
    ctx.agree("recipe hash", recipe_hash(recipe))
    ctx.agree("versions", checkpoint.versions())
    built = _build(ctx, recipe)
    ctx.all_ok(lambda: runs.create_run(recipe, path) if ctx.is_main else None)
    return _train(ctx, built, built.state, path, extra_meta={})


def cmd_resume(args: argparse.Namespace) -> int:
    ctx = dist.init()
    recipe = ctx.all_ok(lambda: load_recipe(args.recipe, args.overrides))
    ctx.agree("recipe hash", recipe_hash(recipe))
    ctx.agree("versions", checkpoint.versions())
    source_run = runs.run_path(recipe)
    if args.name:
        recipe = attrs.evolve(recipe, name=args.name)
    target = runs.run_path(recipe)
    shard = sharded(recipe, ctx.world_size)
    snap, (tensors, manifest) = ctx.all_ok(
        lambda: runs.find_snapshot(source_run, args.source, ctx.warn, lambda s: _read(s, shard))
    )
    ctx.agree("snapshot (step, manifest digest)", (manifest["step"], _digest(manifest)))
    built = _build(ctx, recipe)
    ctx.agree("data fingerprint", _digest(built.fingerprint))
    if manifest.get("world_size", 1) != ctx.world_size:
        ctx.warn(
            f"{snap} was written by {manifest.get('world_size', 1)} process(es), this run has "
            f"{ctx.world_size}: the samples and LR of every step stay the same, but params "
            "will be close to, not bitwise equal to, an unbroken run (gradients are reduced "
            "in another order and dropout masks are drawn per rank)"
        )
    allowed, env_warnings = runs.check_resume(
        manifest,
        to_dict(recipe),
        built.fingerprint,
        args.allow_change,
        runs.environment(built.device.type),
    )
    for w in env_warnings:
        ctx.warn(w)
    step = manifest["step"]
    if step >= recipe.steps:
        raise RunError(
            f"snapshot {snap} is at step {step} and the recipe trains {recipe.steps} steps: "
            "nothing to do. To train longer, pass steps=N with --allow-change steps "
            "--allow-change schedule (the schedule's length follows steps)."
        )
    branching = target.resolve() != snap.parent.resolve()
    # `--from latest` skipped newer invalid snapshots: set them aside so training can go on.
    newer = [p for s, p in checkpoint.list_snapshots(target) if s > step] if not branching else []
    if newer and args.source != "latest":
        raise RunError(
            f"{snap} is not the newest snapshot of {target} (state_{runs.latest_step(target)} "
            "is). Resuming in place would overwrite the later history. Branch into a new run "
            "with --name NEW, or resume with --from latest."
        )
    try:  # a sharded read is collective, but a snapshot that does not fit fails every rank alike
        state = (
            dcp.load_into(snap, manifest, built.state)
            if tensors is None
            else built.state.load(tensors)
        )
    except ValueError as err:
        raise RunError(f"{snap}: {err}. Resume with the recipe the run was trained with.") from None
    ctx.agree("loaded step", int(state.step))

    def prepare_target() -> None:  # rank 0 writes; a failure there stops every rank alike
        if not ctx.is_main:
            return
        for p in runs.clean_partial(target):
            ctx.warn(f"removed {p}, left over by an interrupted write")
        for p in newer:
            ctx.warn(f"set aside invalid snapshot {p} as {runs.set_aside(p).name}")
        if branching:
            runs.create_run(
                recipe, target, metrics=runs.metrics_until(snap.parent / runs.METRICS_FILE, step)
            )
        else:
            runs.cut_metrics(target / runs.METRICS_FILE, step)

    ctx.all_ok(prepare_target)
    extra = {
        "parent": str(snap.resolve()) if branching else manifest.get("parent"),
        "allowed_changes": list(manifest.get("allowed_changes", [])) + allowed,
    }
    return _train(ctx, built, state, target, extra_meta=extra, resumed_from=snap)


def _read(snap: Path, sharded: bool) -> tuple:
    """(tensors, manifest) of a snapshot, every checksum verified. A sharded run reading a
    sharded snapshot gets tensors None: each rank reads its own rows later (`dcp.load_into`)."""
    manifest = checkpoint.read_manifest(snap)
    if not (sharded and manifest.get("layout") == "dcp"):
        return checkpoint.load(snap)
    checkpoint.check(snap)  # on every rank, so that all pick the same snapshot
    dcp.read_metadata(snap)  # DCP unpickles it on every rank: refuse a bad one here
    return None, manifest


def _build(ctx, recipe) -> Built:
    """Build on every rank; a failure on any rank (e.g. missing data) fails all of them."""

    def build_and_probe() -> Built:
        w, r = ctx.world_size, ctx.rank
        extra = ctx.transforms(sharded=sharded(recipe, w))
        built = build(recipe, world_size=w, rank=r, transforms_extra=extra)
        probe(built, world_size=w, rank=r)
        return built

    return ctx.all_ok(build_and_probe)


def _digest(value) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _train(ctx, built: Built, state, path: Path, *, extra_meta: dict, resumed_from=None) -> int:
    recipe = built.recipe
    start = int(state.data["samples"])
    loader = iter(train_loader(built, start=start, world_size=ctx.world_size, rank=ctx.rank))
    loader = dist.traced(loader, ctx, start, recipe.data.batch_size)
    progress = Progress(recipe.steps, int(state.step)) if ctx.is_main else None
    meta = {
        "recipe": to_dict(recipe),
        "recipe_hash": recipe_hash(recipe),
        "data": built.fingerprint,
        "device": built.device.type,
        "world_size": ctx.world_size,
        **extra_meta,
    }

    def on_log(record: dict) -> None:
        if progress is not None:
            append_metrics(path / runs.METRICS_FILE, record)
            progress.update(record)

    writer = _writer(ctx, state) if recipe.checkpoint.async_save else None

    def retain(snap: Path) -> None:  # once `snap` is published (on the writer thread if async)
        ck = recipe.checkpoint
        runs.retain(path, ck.keep_last, keep={snap, resumed_from}, keep_every=ck.keep_every)

    def write(s) -> None:
        snap, snap_meta = path / f"state_{int(s.step)}", {"step": int(s.step), **meta}
        sharded = s.static.sharding is not None  # then every rank writes its rows
        if not (sharded or ctx.is_main):
            return
        if writer is not None:  # returns once copied: the next in-place step cannot race it
            writer.save(snap, s.tensors(), snap_meta, on_done=retain if ctx.is_main else None)
        elif sharded:
            dcp.save(snap, s, snap_meta)
            if ctx.is_main:
                retain(snap)
        else:
            retain(checkpoint.save(snap, s.tensors(), snap_meta))

    stop = preempt.Preemption(recipe.checkpoint.signal)
    stopping = False

    def should_stop() -> bool:  # every rank asks after every step; all get the same answer
        nonlocal stopping
        stopping = ctx.any_rank(stop.requested is not None)
        return stopping

    def failed(err: Exception, last: bool) -> None:  # a snapshot write failed
        if recipe.checkpoint.on_error == "stop" or last:
            raise checkpoint.SnapshotError(preempt.stopped_by_error(err, last)) from None
        ctx.warn(f"{err}; training goes on (checkpoint.on_error: continue)")

    def on_snapshot(s) -> None:
        try:
            ctx.all_ok(lambda: write(s))  # a failed write fails every rank alike
        except (checkpoint.SnapshotError, RunError) as err:
            failed(err, last=stopping or int(s.step) == recipe.steps)

    def settle(last: bool) -> None:  # a failed async write: raised at the next step, or at exit
        if writer is None:
            return
        try:
            writer.wait_until_finished() if last else writer.check()
        except checkpoint.SnapshotError as err:
            failed(err, last)

    try:
        with writer or contextlib.nullcontext(), stop:  # waits for the last write, raises its error
            final = train(
                state,
                loader,
                steps=recipe.steps,
                device=built.device,
                log_every=recipe.log_every,
                on_log=on_log,
                snapshot_every=recipe.checkpoint.every,
                on_snapshot=on_snapshot,
                eval_every=recipe.eval.every,
                eval_loss=_eval_loss(ctx, built),
                poll=lambda: settle(last=False),
                should_stop=should_stop,
            )
            settle(last=True)
            stopped = int(final.step) < recipe.steps
            if stopped and ctx.is_main:  # said while a second SIGTERM (e.g. torchrun's) waits
                message = preempt.stopped_message(stop.requested, path, int(final.step))
                print(message, file=sys.stderr)
    finally:
        if progress is not None:
            progress.close()
    if stopped:
        return preempt.EXIT_PREEMPTED
    if progress is not None:
        progress.message(f"done: {path} (step {recipe.steps})")
    return 0


def _writer(ctx, state) -> AsyncWriter | None:
    """The async snapshot writer: rank 0's alone, or every rank's for a sharded state."""
    if state.static.sharding is not None:
        return AsyncWriter(write=dcp.async_writer(state.static.sharding))
    return AsyncWriter() if ctx.is_main else None


def _eval_loss(ctx, built: Built):
    """The validation loss of a state (mean over ranks), or None when the run has no eval."""
    if not built.recipe.eval.every or built.val is None:
        return None

    def eval_loss(s):
        batches = make_loader(
            built.val,
            batch_size=built.local_batch,
            seed=0,
            shuffle=False,
            world_size=ctx.world_size,
            rank=ctx.rank,
        )
        return ctx.mean(evaluate(s, iter(batches), built.recipe.eval.batches, built.device))

    return eval_loss


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    # A `state_N` dir without its manifest is a damaged snapshot, not an empty run: say so.
    if (path / checkpoint.MANIFEST).exists() or re.fullmatch(r"state_\d+", path.name):
        report = _snapshot_report(path)
        if args.json:
            sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            _print_snapshot(report)
        return 0 if report["valid"] else 1
    if path.is_dir():
        rows = [_snapshot_row(p) for _, p in checkpoint.list_snapshots(path)]
        if args.json:
            sys.stdout.write(
                orjson.dumps(
                    {"run": str(path), "snapshots": rows}, option=orjson.OPT_INDENT_2
                ).decode()
                + "\n"
            )
        else:
            _print_run(path, rows)
        return 0
    raise RunError(f"{path} is neither a snapshot (no {checkpoint.MANIFEST}) nor a run directory")


def _snapshot_report(path: Path) -> dict:
    manifest = checkpoint.read_manifest(path)
    problems = checkpoint.verify(path)
    sizes = {
        entry: sum(leaf["nbytes"] for leaf in spec["leaves"])
        for entry, spec in manifest["entries"].items()
    }
    return {
        "path": str(path),
        "step": manifest["step"],
        "valid": not problems,
        "problems": problems,
        "digests": checkpoint.digests(path) if not problems else {},
        "sizes": sizes,
        "manifest": manifest,
    }


def _print_snapshot(r: dict) -> None:
    m = r["manifest"]
    print(f"snapshot  {r['path']}")
    print(f"step      {r['step']}")
    print(f"created   {m['created']}")
    print(f"valid     {'yes' if r['valid'] else 'NO'}")
    for p in r["problems"]:
        print(f"  problem: {p}")
    for key in ("recipe_hash", "device", "world_size", "layout", "parent"):
        if m.get(key) is not None:
            print(f"{key:<9} {m[key]}")
    print("versions  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for change in m.get("allowed_changes", []):
        print(f"allowed   {change}")
    print(f"{'entry':<10}{'bytes':>14}  sha256")
    for entry, size in r["sizes"].items():
        print(f"{entry:<10}{size:>14}  {r['digests'].get(entry, '-')}")


def _snapshot_row(path: Path) -> dict:
    problems = checkpoint.verify(path)
    try:
        m = checkpoint.read_manifest(path)
        created, size = m["created"], sum(f["bytes"] for f in m["files"].values())
    except checkpoint.SnapshotError:
        created, size = None, None
    return {
        "name": path.name,
        "step": int(path.name.split("_")[1]),
        "created": created,
        "bytes": size,
        "valid": not problems,
        "problem": problems[0] if problems else None,
    }


def _print_run(path: Path, rows: list[dict]) -> None:
    print(f"run {path}: {len(rows)} snapshot(s)")
    print(f"{'step':>10}  {'created':<27}{'bytes':>14}  status")
    for r in rows:
        status = "valid" if r["valid"] else f"INVALID: {r['problem']}"
        print(f"{r['step']:>10}  {r['created'] or '?':<27}{r['bytes'] or 0:>14}  {status}")


if __name__ == "__main__":
    sys.exit(main())
