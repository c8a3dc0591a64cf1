"""`functrain run | resume | check | inspect | plot | prepare | export | sample`: the CLI.

User errors (bad recipe, missing or corrupt snapshot, changed recipe or data: every
`functrain.errors.UserError`) end with one paragraph on stderr and exit status 2, never a
traceback, and leave run directories as they were: every check runs before anything is
written. `FUNCTRAIN_DEBUG=1` prints the traceback of what caused one, too. Any other
exception is a bug and keeps its traceback. A run stopped by SIGTERM, a first Ctrl-C or
`checkpoint.signal` writes a snapshot and exits 143; a second Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import orjson

from functrain import checkpoint, distributed
from functrain.checkpoint.manager import NoValidSnapshot
from functrain.cli.check import check
from functrain.cli.export import export, export_pretrained
from functrain.cli.plot import plot
from functrain.cli.rebuild import add_model_flags
from functrain.cli.report import inspect
from functrain.cli.sample import sample
from functrain.data import prepare
from functrain.errors import ERROR_FILE_ENV, RunError, UserError, error_record
from functrain.recipe import Recipe, load_recipe, recipe_hash
from functrain.run import preempt, resume, rundir
from functrain.run.build import build_and_probe
from functrain.run.trainer import Trainer

__all__ = ["EXIT_PEER_LOST", "EXIT_USER_ERROR", "console", "main"]

EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3  # under torchrun: another rank died or timed out
#: Set to print, after a user error's paragraph, the traceback of what caused it.
DEBUG_ENV = "FUNCTRAIN_DEBUG"


def main(argv: list[str] | None = None) -> int:
    _components_from_working_directory()
    args = _parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    try:
        return args.func(args)
    except UserError as err:
        if distributed.env_rank() == 0:  # under torchrun every rank fails alike; one says why
            print(f"functrain {args.command}: error: {err}", file=sys.stderr)
            if os.environ.get(DEBUG_ENV):
                traceback.print_exception(err, file=sys.stderr)
            if os.environ.get(ERROR_FILE_ENV):
                _write_error(Path(os.environ[ERROR_FILE_ENV]), err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"functrain {args.command}: interrupted", file=sys.stderr)
        return preempt.EXIT_ABORTED
    except RuntimeError as err:
        explained = distributed.peer_failure(err)
        if explained is None:
            raise
        print(
            f"functrain {args.command}: error on rank {distributed.env_rank()}: {explained}",
            file=sys.stderr,
        )
        return EXIT_PEER_LOST
    finally:
        distributed.close()


def console() -> None:
    """The process: `functrain ...` and `python -m functrain ...`. A torchrun worker ends
    through `distributed.leave` (see there why), with the status `main` returns or, for a
    bug, 1 after its traceback."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(main())
    try:
        code = main()
    except SystemExit as err:  # argparse's, before any process group
        code = err.code if isinstance(err.code, int) else 1 if err.code else 0
    except BaseException:  # noqa: BLE001 -- a bug: its traceback, as Python prints it
        traceback.print_exc()
        code = 1
    distributed.leave(code)


def _write_error(path: Path, err: UserError) -> None:
    path.write_bytes(orjson.dumps(error_record(err)))


def _components_from_working_directory() -> None:
    """Let a recipe name `my_project.model` from the working directory, as `python -m
    functrain` does (it puts the working directory first on `sys.path`; a console script
    puts its own folder there instead)."""
    if not any(p in ("", os.getcwd()) for p in sys.path):
        sys.path.insert(0, os.getcwd())


def _parse(argv: list[str]) -> argparse.Namespace:
    """`functrain COMMAND ...`; options may come before or after the `key=value` overrides."""
    commands = _commands()
    top = argparse.ArgumentParser(
        prog="functrain",
        description="Train a PyTorch model from a recipe, and resume it exactly: a run "
        "resumed from any snapshot ends bitwise where the unbroken run would.",
        epilog="Run `functrain COMMAND --help` for a command's options. Start with: "
        "functrain run recipes/tiny.yaml",
    )
    top.add_argument(
        "--version", action="version", version=f"functrain {checkpoint.versions()['functrain']}"
    )
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
    run.add_argument(
        "--auto-resume",
        action="store_true",
        help="if the run directory holds snapshots, continue from the newest valid one as "
        "`resume --from latest` would (for restarted jobs); else start (the recipe's "
        "auto_resume: true does the same)",
    )
    _until(run)

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
    _until(res)

    chk = command(
        "check",
        "prove that a recipe resumes bitwise on this machine (exit 0), or name the first "
        "difference and its likely cause (exit 1)",
        cmd_check,
    )
    chk.add_argument("recipe", help="path to a recipe YAML file")
    chk.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    chk.add_argument(
        "--steps", type=int, default=None, metavar="N", help="steps in all (8, or fewer)"
    )
    chk.add_argument("--at", type=int, default=None, metavar="K", help="resume after (N // 2)")
    chk.add_argument(
        "--nproc",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: train on 2 processes (torchrun) and resume on 1 (1)",
    )
    chk.add_argument(
        "--keep", type=Path, default=None, metavar="DIR", help="keep the runs in this new directory"
    )

    ins = command(
        "inspect",
        "show a snapshot's manifest and digests, or a run's snapshots and lineage",
        cmd_inspect,
    )
    ins.add_argument("path", help="a snapshot directory or a run directory")
    ins.add_argument("--json", action="store_true", help="one JSON object on stdout")

    plt = command(
        "plot",
        "draw runs' loss, eval loss, LR and throughput as a PNG (needs functrain[plot])",
        cmd_plot,
    )
    plt.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    plt.add_argument(
        "--out", type=Path, default=None, help="the PNG to write (default: FIRST_RUN/plot.png)"
    )

    pre = command("prepare", "tokenize text files into token files for token_file", cmd_prepare)
    pre.add_argument(
        "inputs", nargs="*", metavar="TEXT", help="files or folders (none: the default corpus)"
    )
    pre.add_argument("--out", required=True, type=Path, help="the new directory to write")
    pre.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail (0.05)")
    pre.add_argument("--max-bytes", type=int, default=None, help="stop after this much text")
    pre.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a Hugging Face tokenizer.json (needs functrain[tokenizers]); default: bytes",
    )
    exp = command(
        "export", "write a snapshot's weights as safetensors, for the plain nn.Module", cmd_export
    )
    exp.add_argument("snapshot", type=Path, help="a snapshot directory (state_N)")
    target = exp.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="the .safetensors file to write")
    target.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="a transformers model: the save_pretrained directory to write (from_pretrained "
        "loads it)",
    )
    exp.add_argument("--ema", action="store_true", help="the EMA of the params instead")
    add_model_flags(exp, only=" (for --hf)")
    smp = command(
        "sample", "text from a language-model snapshot, deterministic per seed", cmd_sample
    )
    smp.add_argument("snapshot", type=Path, help="a snapshot directory (state_N)")
    smp.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    smp.add_argument("--tokens", type=int, default=200, help="tokens to add (200)")
    smp.add_argument("--temperature", type=float, default=0.8, help="0: greedy (0.8)")
    smp.add_argument("--top-k", type=int, default=40, help="draw from the k likeliest (40)")
    smp.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    smp.add_argument("--ema", action="store_true", help="the EMA of the params instead")
    add_model_flags(smp)
    return {
        "run": run,
        "resume": res,
        "check": chk,
        "inspect": ins,
        "plot": plt,
        "prepare": pre,
        "export": exp,
        "sample": smp,
    }


def _until(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--until",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after this step (a snapshot of it is written; exit 0); the schedule "
        "still spans the recipe's steps",
    )


def _check_until(until: int | None, recipe: Recipe) -> None:
    if until is not None and not 0 < until <= recipe.steps:
        raise RunError(
            f"--until {until}: give a step > 0 and at most the recipe's steps "
            f"({recipe.steps}); to train longer, change steps"
        )


def cmd_run(args: argparse.Namespace) -> int:
    ctx = distributed.init()
    recipe = _load_agreed(ctx, args)
    _check_until(args.until, recipe)
    path = rundir.run_path(recipe)
    auto = args.auto_resume or recipe.auto_resume
    # decided once, by rank 0, and every rank follows: torchrun restarts all workers alike
    if auto and ctx.share(ctx.all_ok(lambda: rundir.has_snapshots(path) if ctx.is_main else None)):
        ctx.warn(f"--auto-resume: {path} holds snapshots; continuing from the newest valid one")
        try:
            return _resume(ctx, recipe, args, source="latest", name=None, allow=[])
        except resume.NothingToDo:  # a job restarted after its run had finished
            ctx.warn(f"--auto-resume: {path} is finished already (step {recipe.steps})")
            return 0
        except NoValidSnapshot as err:  # never start afresh over a damaged history
            raise RunError(_all_invalid(path, err.skipped)) from err
    built = build_and_probe(recipe, ctx)
    owner = ctx.all_ok(
        lambda: rundir.create_run(recipe, path, restart=auto) if ctx.is_main else None
    )
    with owner or contextlib.nullcontext():  # rank 0 owns the run directory until the end
        rundir.check_shared(ctx, path, owner)
        return _start(
            ctx,
            path,
            lambda: Trainer(
                built,
                built.state,
                path,
                until=args.until,
                recipe_path=shlex.join([args.recipe, *args.overrides]),
            ),
        )


def _all_invalid(path: Path, skipped: list[Path]) -> str:
    return (
        f"--auto-resume: run directory {path} holds snapshots, but none is valid "
        f"({', '.join(p.name for p in skipped)}: each named above with its problem). Nothing "
        "was changed: they are left as they are, and the run is not started afresh over a "
        f"damaged history. Look at them (functrain inspect {path}); then, to start afresh, "
        "remove them (or the whole run directory) and run the same command again, or start "
        "a new run beside it with name=NEW."
    )


def cmd_resume(args: argparse.Namespace) -> int:
    ctx = distributed.init()
    recipe = _load_agreed(ctx, args)
    return _resume(ctx, recipe, args, args.source, name=args.name, allow=args.allow_change)


def _resume(
    ctx: distributed.Context,
    recipe: Recipe,
    args: argparse.Namespace,
    source: str,
    *,
    name: str | None,
    allow: list[str],
) -> int:
    r = resume.prepare(  # it refuses an --until outside (snapshot step, steps]
        ctx, recipe, source, name=name, allow=allow, until=args.until
    )
    branched = r.run_dir.resolve() != r.snapshot.parent.resolve()
    with r.owner or contextlib.nullcontext():  # rank 0 owns the run directory until the end
        rundir.check_shared(ctx, r.run_dir, r.owner)
        return _start(
            ctx,
            r.run_dir if branched else None,
            lambda: Trainer(
                r.built,
                r.state,
                r.run_dir,
                meta=r.meta,
                resumed_from=r.snapshot,
                until=args.until,
                recipe_path=shlex.join([args.recipe, *args.overrides]),
                data_restored=r.data_restored,
            ),
        )


def _start(ctx: distributed.Context, new_dir: Path | None, make: Callable[[], Trainer]) -> int:
    """Make the trainer and run it. If making it fails (a metric sink that did not start:
    W&B not logged in), `new_dir`, a run directory this command just made and which holds
    no step yet, is removed, so that no run is left behind."""
    try:
        trainer = make()
    except UserError:
        if ctx.is_main and new_dir is not None:
            shutil.rmtree(new_dir, ignore_errors=True)
        raise
    return trainer.run()


def cmd_check(args: argparse.Namespace) -> int:
    return check(
        args.recipe,
        args.overrides,
        steps=args.steps,
        at=args.at,
        nproc=args.nproc,
        keep=args.keep,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        verdict=print,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    return inspect(Path(args.path), args.json)


def cmd_plot(args: argparse.Namespace) -> int:
    out = plot(args.runs, args.out or args.runs[0] / "plot.png")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.hf is not None:
        out = export_pretrained(
            args.snapshot, args.hf, ema=args.ema, recipe=args.recipe, trust_recipe=args.trust_recipe
        )
        print(f"wrote {out}: a save_pretrained directory", file=sys.stderr)
        return 0
    meta = export(args.snapshot, args.out, ema=args.ema)
    print(f"wrote {args.out}: {meta['weights']} of step {meta['step']}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    text = sample(
        args.snapshot,
        prompt=args.prompt,
        tokens=args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        ema=args.ema,
        recipe=args.recipe,
        trust_recipe=args.trust_recipe,
    )
    sys.stdout.write(text + "\n")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    meta = prepare(
        args.inputs,
        args.out,
        val_fraction=args.val_fraction,
        max_bytes=args.max_bytes,
        progress=_ByteProgress(),
        tokenizer=args.tokenizer,
    )
    tokens = meta["tokens"]
    print(
        f"wrote {args.out}: {tokens['train']:,} train and {tokens['val']:,} val tokens "
        f"({meta['tokenizer']}, vocab {meta['vocab_size']}); train on it with "
        f"data.dataset={{_component_: functrain.data.token_file, path: {args.out}}}",
        file=sys.stderr,
    )
    return 0


class _ByteProgress:
    """`prepare`'s progress: one updating line on a terminal, a line per quarter otherwise."""

    def __init__(self) -> None:
        self.tty, self.shown = sys.stderr.isatty(), -1

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // total
        if self.tty:
            end = "\n" if done == total else ""
            print(f"\rprepare: {done / 2**20:.1f} / {total / 2**20:.1f} MiB ({pct}%)", end=end,
                  file=sys.stderr, flush=True)  # fmt: skip
        elif pct // 25 > self.shown:
            self.shown = pct // 25
            print(
                f"prepare: {done / 2**20:.1f} / {total / 2**20:.1f} MiB ({pct}%)", file=sys.stderr
            )


def _load_agreed(ctx: distributed.Context, args: argparse.Namespace) -> Recipe:
    """The recipe with its overrides, the same on every rank, as is the software."""
    recipe = ctx.all_ok(lambda: load_recipe(args.recipe, args.overrides))
    ctx.agree("recipe hash", recipe_hash(recipe))
    ctx.agree("versions", checkpoint.versions())
    return recipe


if __name__ == "__main__":
    sys.exit(main())
