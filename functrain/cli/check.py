"""`functrain check RECIPE`: prove on this machine that a recipe resumes bitwise, or show
where and why it does not.

In a scratch directory it trains the recipe `n` steps straight, and again `k` steps, then
resumes that run in a new process and trains on to `n`, each run a real `functrain` process
with the recipe's workers. Both runs write a snapshot at every step and trace the samples of
every batch (`FUNCTRAIN_TRACE`). Then, step by step:

    the global batch of each step     same samples?  (else: randomness in the dataset)
    every state entry (digests)        same bits?     (else: the model, kernels, or state
    the metrics record                 same losses?    the snapshot does not hold)

With `nproc=2` the two runs use 2 processes and the resume 1 — bitwise only for a canonical
recipe (`micro_batch_size`); for another recipe the resume stays on 2 processes, and the
verdict says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import orjson
import torch

from functrain import checkpoint
from functrain.distributed import TRACE_ENV, read_trace
from functrain.errors import ERROR_FILE_ENV, RunError
from functrain.recipe import load_recipe
from functrain.run import rundir
from functrain.run.build import world_size_exact

__all__ = ["Difference", "check", "first_difference"]

#: The order in which the entries of a differing step are named: the first is the "first
#: entry that differs" (data before what is computed from it).
_ENTRY_ORDER = (
    "data", "step", "rng", "params", "frozen", "buffers", "opt", "stats", "metrics"
)  # fmt: skip
#: Exit status of a check that found a difference.
EXIT_DIFFERS = 1


@attrs.frozen
class Difference:
    """The first step at which the resumed run leaves the straight one, and why."""

    step: int
    entries: list[str]  # the state entries that differ at `step`, in `_ENTRY_ORDER`
    leaf: str | None  # the first differing leaf of entries[0], with how far apart
    batch_step: int | None  # the first step whose batch differs (<= step), if any
    order_differs: bool  # the dataset indices differ too, not only the samples' content
    metric: str | None  # the first metrics field that differs at `step`, if the state did not
    cause: str

    def describe(self, resumed_at: int) -> str:
        where = f"step {self.step}"
        if self.entries:
            what = f"state entry {self.entries[0]!r}" + (f" ({self.leaf})" if self.leaf else "")
            if len(self.entries) > 1:
                what += f"; also {', '.join(self.entries[1:])}"
        else:
            what = f"metric {self.metric!r} (every state entry is equal)"
        when = (
            "the first step after the resume"
            if self.step == resumed_at + 1
            else f"{self.step - resumed_at} steps after the resume at {resumed_at}"
            if self.step > resumed_at
            else "before the resume, so two runs from scratch already differ"
        )
        return f"first difference at {where} ({when}): {what}. Likely cause: {self.cause}"


def check(
    recipe_path: str,
    overrides: list[str],
    *,
    steps: int | None = None,
    at: int | None = None,
    nproc: int = 1,
    keep: Path | None = None,
    log=print,
    verdict=print,
) -> int:
    """Run the check (module docstring): progress and notes go to `log`, the one-line
    verdict to `verdict`. Returns 0 when the resumed run is bitwise the straight one,
    `EXIT_DIFFERS` otherwise."""
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe is refused here, by name
    n = steps if steps is not None else min(recipe.steps, 8)
    if not 2 <= n <= recipe.steps:
        raise RunError(f"--steps {n}: give 2 to the recipe's steps ({recipe.steps})")
    k = at if at is not None else n // 2
    if not 0 < k < n:
        raise RunError(f"--at {k}: give a step between 1 and --steps - 1 ({n - 1})")
    if nproc not in (1, 2):
        raise RunError(f"--nproc {nproc}: give 1 or 2")
    if keep is not None and keep.exists():
        raise RunError(f"--keep {keep} exists; name a new directory")
    resume_nproc = nproc
    notes = []
    if recipe.determinism != "strict":
        notes.append(
            f"determinism: {recipe.determinism}: nondeterministic kernels are allowed, so "
            "this recipe is not promised bitwise: equal bits here are this run's luck, not "
            "a guarantee (set determinism: strict for the promise)"
        )
    if os.environ.get("WORLD_SIZE") or os.environ.get("RANK"):
        raise RunError(
            "functrain check launches its own processes (torchrun too, with --nproc 2); run "
            "it as one plain process, not under torchrun"
        )
    if nproc == 2:
        if world_size_exact(recipe):  # canonical micro-batches
            resume_nproc = 1
        else:
            notes.append(
                "2 -> 1 processes is not bitwise for this recipe (no step.N.micro_batch_size), "
                "so the resume ran on 2 processes; give forward_backward "
                "a micro_batch_size for bits that do not depend on the world size"
            )
    scratch = Path(tempfile.mkdtemp(prefix="functrain-check-")) if keep is None else keep
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        evals = [f"eval.every={k}"] if recipe.eval.every else []  # eval inside the check too
        runs = _Runs(recipe_path, [*overrides, *evals], scratch, nproc)
        log(f"check: {n} steps straight on {nproc} process(es) ...")
        runs.launch("straight", ["run", "--until", str(n)], nproc)
        log(f"check: {k} steps, then a resume in a new process on {resume_nproc} to step {n} ...")
        runs.launch("first", ["run", "--until", str(k)], nproc, name="resumed")
        try:
            runs.launch(
                "second", ["resume", "--from", "latest", "--until", str(n)], resume_nproc,
                name="resumed",
            )  # fmt: skip
        except PhaseFailed as err:
            if (err.refusal or {}).get("what") != "data":
                raise
            verdict(f"check: DIFFERS: the resume at step {k} was refused. {err}{_FINGERPRINT_HINT}")
            return EXIT_DIFFERS
        found = first_difference(scratch, recipe.data.batch_size, n)
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    shape = f"{n} steps straight and {k} + resume in a new process + {n - k}"
    if nproc == 2:
        shape += f" (2 processes, resumed on {resume_nproc})"
    for note in notes:
        log(f"check: note: {note}")
    if found is None:
        luck = "" if recipe.determinism == "strict" else " (this time: not promised, see note)"
        verdict(
            f"check: bitwise{luck}: {recipe_path} resumes exactly on this machine: {shape} end "
            "with every state entry equal at every step and the same metrics"
        )
        return 0
    verdict(f"check: DIFFERS: {shape}: {found.describe(k)}")
    if keep is not None:
        log(f"check: the runs are in {keep} (straight/, resumed/, trace/)")
    return EXIT_DIFFERS


class PhaseFailed(RunError):
    """A phase of the check ended with an error; `refusal` is what the CLI recorded of a
    user error (`error`, `what`, `message`; `ERROR_FILE_ENV`), None for any other failure."""

    def __init__(self, refusal: dict | None, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


@attrs.define
class _Runs:
    """The scratch directory's runs, each phase a `functrain` process (or torchrun)."""

    recipe_path: str
    overrides: list[str]
    scratch: Path
    nproc: int

    def launch(self, phase: str, command: list[str], nproc: int, name: str = "straight") -> None:
        every_step = [
            f"out_dir={self.scratch}",
            f"name={name}",
            "log_every=1",
            "checkpoint.every=1",
            "checkpoint.keep_last=null",
            "checkpoint.keep_every=null",
            "log.tensorboard=false",  # no W&B runs, no event files for a scratch run
            "log.wandb=false",
        ]  # free keys: they change no bit of training
        args = [command[0], self.recipe_path, *self.overrides, *every_step, *command[1:]]
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        env[TRACE_ENV] = str(self.scratch / "trace" / phase)
        error_file = self.scratch / f"{phase}.error.json"
        env[ERROR_FILE_ENV] = str(error_file)
        if self.nproc > 1:  # torchrun sets 1 thread for 2 processes, not for 1: the same
            env.setdefault("OMP_NUM_THREADS", "1")  # count on both sides of the resume
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
        try:
            out = subprocess.run(
                [*cmd, "-m", "functrain", *args], capture_output=True, text=True, env=env,
                timeout=_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise RunError(
                f"the {phase} run of the check took over {_TIMEOUT_S} s and was stopped; "
                "check fewer steps (--steps) or a smaller model (key=value overrides)"
            ) from err
        (self.scratch / f"{phase}.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-12:])
            refusal = orjson.loads(error_file.read_bytes()) if error_file.exists() else None
            raise PhaseFailed(
                refusal,
                f"the {phase} run of the check failed (exit {out.returncode}), so exactness "
                f"could not be checked (with --keep DIR its whole output stays in "
                f"DIR/{phase}.log); its output ends:\n{tail}",
            )


#: A launcher's variables, which would make a child process wait for peers that never come.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip
#: The most one phase may take: a check is meant to take seconds to minutes.
_TIMEOUT_S = 1800
#: Said when the resume was refused because the data's content hash changed between processes.
_FINGERPRINT_HINT = (
    "\nLikely cause: the dataset's content hash differs between two processes reading the same data: its "
    "__getitem__ returns other samples in another process, which is randomness in the "
    "dataset not seeded from the sample index (torch.rand, random or numpy.random drawn in "
    "__getitem__ or a transform). Derive it from the index, or give the dataset a "
    "fingerprint() method."
)


def first_difference(scratch: Path, batch_size: int, n: int) -> Difference | None:
    """Compare `scratch/straight` with `scratch/resumed` at steps 1..n; None when equal."""
    straight, resumed = scratch / "straight", scratch / "resumed"
    batches = {
        "straight": _batches(scratch / "trace" / "straight", batch_size),
        "resumed": {
            **_batches(scratch / "trace" / "first", batch_size),
            **_batches(scratch / "trace" / "second", batch_size),
        },
    }
    metrics = {name: _metrics(run) for name, run in (("straight", straight), ("resumed", resumed))}
    for s in range(1, n + 1):
        a, b = (checkpoint.digests(run / f"state_{s}") for run in (straight, resumed))
        entries = sorted((e for e in a.keys() | b.keys() if a.get(e) != b.get(e)), key=_entry_rank)
        metric = _first_field(metrics["straight"].get(s), metrics["resumed"].get(s))
        if not entries and metric is None:
            continue
        batch_step, order = _first_batch(batches, s)
        leaf = (
            _leaf(straight / f"state_{s}", resumed / f"state_{s}", entries[0]) if entries else None
        )
        return Difference(
            step=s,
            entries=entries,
            leaf=leaf,
            batch_step=batch_step,
            order_differs=order,
            metric=metric,
            cause=_cause(entries, batch_step, order, s),
        )
    return None


def _entry_rank(entry: str) -> tuple[int, str]:
    return (_ENTRY_ORDER.index(entry) if entry in _ENTRY_ORDER else len(_ENTRY_ORDER), entry)


def _batches(trace: Path, batch_size: int) -> dict[int, tuple[list, list[str]]]:
    """Step -> (dataset indices, sample digests) of the global batch."""
    return {
        cursor // batch_size + 1: (batch["indices"], batch["rows"])
        for cursor, batch in read_trace(trace).items()
    }


def _first_batch(batches: dict, until: int) -> tuple[int | None, bool]:
    """The first step <= `until` whose global batch differs, and whether its indices do."""
    for s in range(1, until + 1):
        a, b = batches["straight"].get(s), batches["resumed"].get(s)
        if a is not None and b is not None and a != b:
            return s, a[0] != b[0]
    return None, False


def _metrics(run: Path) -> dict[int, dict]:
    rows = rundir.read_metrics(run / rundir.METRICS_FILE)
    return {r["step"]: {k: v for k, v in r.items() if k != "samples_per_s"} for r in rows}


def _first_field(a: dict | None, b: dict | None) -> str | None:
    if a == b:
        return None
    a, b = a or {}, b or {}
    return next(k for k in (*a, *b) if a.get(k) != b.get(k))


def _leaf(a: Path, b: Path, entry: str) -> str | None:
    """The first leaf of `entry` that differs between two raw snapshots, and by how much."""
    try:
        ta, tb = checkpoint.load(a)[0].get(entry), checkpoint.load(b)[0].get(entry)
    except Exception:  # a sharded snapshot (DCP's files): the entry's name must do
        return None
    if ta is None or tb is None:
        return None
    if isinstance(ta, torch.Tensor) or isinstance(tb, torch.Tensor):  # `step`, `rng`
        ta, tb = {"": ta}, {"": tb}
        leaves_a, leaves_b = ta, tb
    else:
        leaves_a = dict(ta.items(include_nested=True, leaves_only=True))
        leaves_b = dict(tb.items(include_nested=True, leaves_only=True))
    for key in leaves_a:
        x, y = leaves_a[key], leaves_b.get(key)
        name = (".".join(key) if isinstance(key, tuple) else key) or entry
        if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
            return f"{name} differs in shape or dtype"
        if not torch.equal(x, y):
            if x.is_floating_point():
                gap = (x.double() - y.double()).abs().max().item()
                return f"{name}, up to {gap:.3g} apart"
            return name
    return None


def _cause(entries: list[str], batch_step: int | None, order: bool, step: int) -> str:
    if batch_step is not None and order:
        return (
            f"the batch of step {batch_step} holds other dataset indices: the sample order "
            "itself changed, which functrain's cursor should never allow; please report it "
            "with the recipe"
        )
    if batch_step is not None:
        return (
            f"the batch of step {batch_step} has the same dataset indices but other samples: "
            "the dataset returns something else for the same index in another process — "
            "randomness not seeded from the sample index (torch.rand, random or numpy.random "
            "drawn in __getitem__ or a transform). Derive it from the index, e.g. "
            "torch.Generator().manual_seed(hash((seed, index)))"
        )
    if entries and entries[0] == "data":
        return "the data cursor differs: the loader's position was not restored; please report it"
    if entries and entries[0] in ("params", "frozen", "buffers", "opt"):
        return (
            "the batches are identical, so the model's computation differs: state kept "
            "outside the TrainState (a module attribute changed in forward), randomness drawn "
            "from Python's random or NumPy in the model (torch's RNG is seeded from the "
            "state's key inside the step, those are not), or nondeterministic kernels (see "
            "the recipe's determinism settings)"
        )
    return (
        "the batches are identical and no parameter differs: a metric or statistic is "
        "computed from state the snapshot does not hold"
    )
