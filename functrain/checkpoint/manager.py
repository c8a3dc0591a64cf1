"""`Snapshots`: the one manager of a run's snapshots, with orbax's small vocabulary.

    snapshots = Snapshots(run_dir, Policy(every=250, keep_last=3), context=ctx, meta=meta)
    with snapshots:
        ...
        snapshots.maybe_save(state)            # on the policy's steps (last=True: always)
        snapshots.settle()                     # after a failed async write: stop or warn
    snapshots.latest_step(), snapshots.all_steps(), snapshots.find("latest")
    state, path = snapshots.restore("latest", like=state_at_step_0)   # the one resume plan

It decides when to save, writes synchronously or through an `AsyncWriter`, the raw layout
or (with a `sharding`) every rank's shards through DCP, applies retention once a snapshot is
published, and turns a failed write into `Policy.on_error`'s answer. Under torchrun every
call that writes or settles is made on all ranks, and all of them learn of a failure on any
one: they stop alike, with the same error, or all warn and train on. The ranks are reached
through a small `Ranks` protocol (`functrain.distributed.Context` has it), so this package never
imports `functrain.distributed`.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import torch
from tensordict import TensorDict

from functrain.checkpoint import dcp, raw
from functrain.checkpoint._files import list_snapshots, remove, snapshot_path, snapshot_step
from functrain.checkpoint.async_writer import AsyncWriter, ClosedOnExit
from functrain.checkpoint.manifest import DTYPES, read_manifest
from functrain.checkpoint.plan import (
    KNOWN_META,
    frozen_hash,
    plan_resume,
    skeleton,
    with_frozen_of,
    without_frozen,
)
from functrain.checkpoint.raw import file_problems, nest, read_into
from functrain.checkpoint.snapshot import check, load
from functrain.errors import MismatchError, RunError, SnapshotError, warn
from functrain.state import TrainState, missing_added, reset_added

__all__ = ["NoValidSnapshot", "Policy", "Ranks", "Snapshots", "write_seconds_of"]


class Ranks(Protocol):
    """The agreement between ranks the manager needs (`functrain.distributed.Context`)."""

    @property
    def is_main(self) -> bool: ...

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def warn(self, message: str) -> None: ...

    def everyone(self, value: Any) -> list[Any]:
        """Every rank's `value` (plain data), in rank order (a collective)."""

    def all_ok(self, fn: Callable[[], Any], *, patient: bool = False) -> Any:
        """`fn` on every rank, its failure on any raised on all (`patient`: `fn` may be a
        long write on some ranks)."""


class _OneProcess:
    """`Ranks` of a single process: nothing to agree with."""

    is_main = True
    rank, world_size = 0, 1
    warn = staticmethod(warn)

    def everyone(self, value: Any) -> list[Any]:
        return [value]

    def all_ok(self, fn: Callable[[], Any], *, patient: bool = False) -> Any:
        return fn()


@attrs.frozen(kw_only=True)
class Policy:
    """When to save, what to keep, how to write, and what a failed write does."""

    every: int | None = None  # a snapshot every N steps (None: only those asked for)
    keep_last: int | None = None  # retention: the newest N (None: all) ...
    keep_every: int | None = None  # ... plus every snapshot whose step is a multiple of K
    async_save: bool = False  # write in the background; the step stalls only for a copy
    on_error: Literal["stop", "continue"] = "stop"
    #: Leave the frozen params out of each snapshot (the manifest says so, with their hash):
    #: a fine-tuned adapter's snapshot holds the adapter, not the base it was trained on.
    trainable_only: bool = False


class Snapshots(ClosedOnExit):
    """The snapshots of one run directory: find and restore them, save and retain them."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        policy: Policy | None = None,
        *,
        context: Ranks | None = None,
        sharding: dcp.Sharded | None = None,
        meta: Mapping[str, Any] | None = None,
        keep: Iterable[str | os.PathLike | None] = (),
        meta_now: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """`sharding`: every rank writes its shards through DCP (FSDP2); otherwise the main
        rank alone writes the raw layout. `meta` goes into every manifest, and what
        `meta_now()` returns at each save (entries that change, e.g. a stateful dataset's
        position). Retention never deletes the snapshots in `keep` (e.g. the one this
        process resumed from)."""
        self.run_dir = Path(run_dir)
        self.policy = policy or Policy()
        self._ctx = context or _OneProcess()
        self._sharding = sharding
        self._meta = dict(meta or {})
        self._meta_now = meta_now or dict
        self._keep = {Path(p).resolve() for p in keep if p is not None}
        self._writer: AsyncWriter | None = None
        self._frozen_sha256: str | None = None
        self._foreign: set[Path] = set()  # other runs' snapshots retention said it keeps
        #: Seconds the newest finished write took (on rank 0: until it was published).
        self.write_seconds: float | None = None
        if self.policy.async_save and (sharding is not None or self._ctx.is_main):
            write = dcp.async_writer(sharding) if sharding is not None else None  # collective
            self._writer = AsyncWriter(write=write)

    # ---------------------------------------------------------------- finding

    def all_steps(self) -> list[int]:
        """The steps of the published snapshots, oldest first."""
        return [step for step, _ in list_snapshots(self.run_dir)]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def latest(self) -> Path | None:
        """The newest published snapshot (checked by `find("latest")`, not here)."""
        step = self.latest_step()
        return None if step is None else self.path(step)

    def path(self, step: int) -> Path:
        return snapshot_path(self.run_dir, step)

    def find(
        self,
        spec: str,
        read: Callable[[Path], Any] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[Path, Any]:
        """(`latest` (the newest valid), `state_<step>` in the run, or a path, what `read` made
        of it).

        `read(snapshot)` reads and checks it (default: checksums alone) and raises
        SnapshotError when it is invalid; `latest` then warns and tries the next older one.
        So a snapshot is read once, not verified first and read again.
        """
        read, warn = read or check, warn or self._ctx.warn
        run = self.run_dir
        if spec == "latest":
            if not run.is_dir():
                raise RunError(f"no run directory {run}: start the run with `functrain run` first")
            skipped = []
            for _, snap in reversed(list_snapshots(run, published=False)):  # lost manifests too
                try:
                    return snap, read(snap)
                except SnapshotError as err:
                    warn(f"skipping invalid snapshot {snap}: {err}")
                    skipped.append(snap)
            raise NoValidSnapshot(run, skipped[::-1])
        path = run / spec if snapshot_step(spec) is not None and "/" not in spec else Path(spec)
        if not path.is_dir():
            have = ", ".join(p.name for _, p in list_snapshots(run))
            raise RunError(
                f"snapshot {path} not found. "
                + (f"Snapshots of {run}: {have}." if have else f"{run} has no snapshots.")
                + " Use --from latest, state_<step>, or a path to a snapshot directory."
            )
        return path, read(path)

    def restore(
        self,
        spec: str = "latest",
        *,
        like: TrainState,
        expect: Mapping[str, Any] | None = None,
        allow: Iterable[str] = (),
    ) -> tuple[TrainState, Path]:
        """`like` (a state at step 0 of the same run) with the entries of the snapshot
        `spec` (`latest`, `state_<step>` or a path, found as `find` does), and its path.
        With the manager's `sharding` every rank reads only its own rows (a collective).

        The snapshot must fit by the one resume plan (`functrain.checkpoint.plan`), the
        CLI's: its structure always; and what this run is described as — the manager's
        `meta` (as `plan.describe` makes it), updated with `expect` — must match the
        manifest's: the recipe but for free keys and those in `allow`, the data
        fingerprint (each changed field named), the init source. Other versions, devices,
        CPU threads or (for a run whose bits depend on it) world sizes warn. A mismatch is
        a MismatchError naming the snapshot, before anything is loaded.
        """
        sharded = self._sharding is not None
        path, (tensors, manifest) = self.find(spec, lambda p: self.read(p, sharded=sharded))
        tensors = with_frozen_of(like, manifest, tensors)
        now = {**self._meta, **(expect or {})}
        for key, want in (expect or {}).items():  # what the plan does not know: equal
            if key not in KNOWN_META and manifest.get(key) != want:
                raise MismatchError(
                    f"{path} does not match this run: {key}: the snapshot has "
                    f"{manifest.get(key)!r}, this run {want!r}",
                    what=key,
                )
        plan = plan_resume(path, manifest, now, allow=allow, like=like, tensors=tensors)
        for message in plan.warnings:
            self._ctx.warn(message)
        if "run_id" not in self._meta and isinstance(manifest.get("run_id"), str):
            self._meta["run_id"] = manifest["run_id"]  # the run goes on: its retention too
        return self.place(path, tensors, manifest, like), path

    @staticmethod
    def read(
        path: Path, *, sharded: bool = False, ranks: Ranks | None = None, tensors: bool = True
    ) -> tuple[TensorDict | None, dict]:
        """(tensors, manifest) of a snapshot, every checksum verified. For a `sharded` state
        a sharded snapshot gives tensors None: `place` reads each rank's rows; the checksums
        are shared out among the `ranks` (a collective), each rank reading its part of the
        files once, and every rank gets every rank's verdict. `tensors=False`: only the
        checks (tensors None), for a read that comes later."""
        manifest = read_manifest(path)
        if not (sharded and manifest.get("layout") == "dcp"):
            if not tensors:
                check(path)
                return None, manifest
            return load(path)
        ranks = ranks or _OneProcess()
        try:  # every rank reaches `everyone` below, whatever its files do
            mine = file_problems(path, manifest, part=(ranks.rank, ranks.world_size))
        except Exception as err:  # noqa: BLE001 -- reported as this rank's problem
            mine = [f"{path}: {type(err).__name__}: {err}"]
        problems = [p for found in ranks.everyone(mine) for p in found]
        if problems:  # the same on every rank: all skip this snapshot, or none
            raise SnapshotError(problems[0])
        dcp.read_metadata(path)  # DCP unpickles it on every rank: refuse a bad one here
        return None, manifest

    @staticmethod
    def place(
        path: Path,
        tensors: TensorDict | None,
        manifest: dict,
        like: TrainState,
        *,
        in_place: bool = False,
    ) -> TrainState:
        """`like` with what `read` gave: its `tensors` (`in_place`: copied into `like`'s own,
        no second state in memory), or, when they are None, the rows each rank reads for
        itself into `like` (a collective). Call it once `plan_resume` accepted the
        snapshot; one that does not fit is still a MismatchError."""
        try:
            if tensors is not None:
                return like.load(tensors, in_place=in_place)
            theirs = skeleton(manifest, like)
            like.check_fits(theirs)  # every rank alike, before any reads
            reset_added(like.tensors(), missing_added(theirs, like.tensors()))  # an older one's
            if manifest.get("layout") != "dcp":
                return _read_into(path, manifest, like)
            into = like.tensors()  # in place; a trainable_only snapshot's frozen stay `like`'s
            if manifest.get("trainable_only"):
                into = without_frozen(into)
            into = into.exclude(*missing_added(theirs, into))
            dcp.read_shards(path, into, like.static.sharding)
            return like
        except ValueError as err:
            raise MismatchError(
                f"{path}: {err}. Resume with the recipe the run was trained with.",
                what="structure",
            ) from err

    # ---------------------------------------------------------------- saving

    def maybe_save(self, state: TrainState, *, last: bool = False) -> bool:
        """Save `state` if the policy's `every` says so, or if it is the `last` snapshot of
        this process (the final one, or a preemption's), whose failure always ends the run.
        A collective under torchrun: call it on every rank. Returns whether it saved."""
        step, every = int(state.step), self.policy.every
        if not (last or (every and step % every == 0)):
            return False
        self.settle(wait=True)  # the previous write's failure is its own, not this one's
        finite = _check_finite(state, self.path(step), self.latest())  # nan_policy stop: refuse
        start = time.perf_counter()
        error = self._agreed(lambda: self._write(state, step, finite, start))
        if error is not None:
            self._failed(error, last)
        return error is None

    @property
    def failed(self) -> bool:
        """Whether this rank's last async write failed (no wait, nothing raised): tell the
        other ranks, then all call `settle`."""
        return self._writer is not None and self._writer.failed

    def settle(self, *, wait: bool = False, last: bool = False) -> None:
        """Raise a failed async write (or, with `on_error: continue`, warn of it) on every
        rank alike: a collective under torchrun. `wait`: first let the write in flight end;
        `last`: its failure ends the run whatever the policy says."""
        if not self.policy.async_save:
            return
        writer = self._writer
        outcome = (writer.wait_until_finished if wait else writer.check) if writer else None
        error = self._agreed(outcome or (lambda: None))
        if error is not None:
            self._failed(error, last)

    def wait_until_finished(self) -> None:
        """Block until the last write is published; its failure ends the run on every rank."""
        self.settle(wait=True, last=True)

    def retain(self, keep: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
        """Delete all but the newest `keep_last` snapshots, sparing those in `keep` (and the
        manager's) and those whose step is a multiple of `keep_every`; return them. Call it
        only once the newest is published."""
        p = self.policy
        if p.keep_last is None:
            return []
        spare = self._keep | {Path(k).resolve() for k in keep if k is not None}
        spare |= {_newest_finite(self.run_dir)}  # whatever went wrong since, it is kept
        ours = [(step, path) for step, path in list_snapshots(self.run_dir) if self._ours(path)]
        old = [  # keep_last counts this run's own snapshots: another's displaces none of them
            path
            for step, path in ours[: -p.keep_last]
            if path.resolve() not in spare and not (p.keep_every and step % p.keep_every == 0)
        ]
        for path in old:
            remove(path)
        return old

    def _ours(self, path: Path) -> bool:
        """Whether this run's lineage wrote the snapshot at `path` (its manifest's `run_id`
        is ours, or it has none: written before run ids). Another run's snapshot (copied
        in, or published by a second writer) is never deleted: said once, kept."""
        try:
            theirs = read_manifest(path).get("run_id")
        except SnapshotError as err:  # unreadable now: not ours to decide
            why = f"its manifest cannot be read ({err})"
        else:
            if theirs is None or theirs == self._meta.get("run_id"):
                return True
            why = (
                f"another run wrote it (run_id {theirs}, this run's is {self._meta.get('run_id')})"
            )
        if path not in self._foreign:
            self._foreign.add(path)
            self._ctx.warn(
                f"retention leaves {path} alone: {why}; remove it yourself if it is not wanted"
            )
        return False

    def close(self) -> None:
        """Wait for a write in flight and free the staging buffer; raise a pending error."""
        if self._writer is not None:
            self._writer.close()

    # ---------------------------------------------------------------- the parts

    def _write(self, state: TrainState, step: int, finite: bool, start: float) -> None:
        if "run_id" not in self._meta:  # which run wrote a snapshot: retention deletes its own
            self._meta["run_id"] = secrets.token_hex(8)
        path, meta = self.path(step), {"step": step, **self._meta, **self._meta_now()}
        meta["finite"] = finite  # retention keeps the newest finite snapshot whatever comes
        if self.write_seconds is not None:  # how long the one before took (a preemption's budget)
            meta["previous_write_seconds"] = round(self.write_seconds, 3)
        # its own write time is `created` (stamped at sealing) minus this: `write_seconds_of`
        meta["write_started"] = datetime.now(timezone.utc).isoformat()
        tensors = state.tensors()
        if self.policy.trainable_only:
            tensors = without_frozen(tensors)
            meta["trainable_only"] = True
            meta["frozen_names"] = [".".join(k) for k in state.frozen.keys(True, True)]
            if "frozen_sha256" not in meta:  # a loop of its own: hash them once, here
                if self._frozen_sha256 is None:
                    self._frozen_sha256 = frozen_hash(state)
                meta["frozen_sha256"] = self._frozen_sha256
        sharded, main = self._sharding is not None, self._ctx.is_main
        if not (sharded or main):
            return

        def done(published: Path) -> None:
            self.write_seconds = time.perf_counter() - start
            self.retain([published])

        if self._writer is not None:  # returns once copied: the next in-place step cannot race it
            self._writer.save(path, tensors, meta, on_done=done if main else None)
        elif sharded:
            dcp.save(path, tensors, meta, sharding=self._sharding)
            if main:
                done(path)
        else:
            done(raw.save(path, tensors, meta))

    def _agreed(self, fn: Callable[[], Any]) -> SnapshotError | RunError | None:
        """Run `fn` on every rank; the error any rank's `fn` raised, on every rank, or None."""
        try:
            self._ctx.all_ok(fn, patient=True)  # a write may outlast a collective's timeout
        except (SnapshotError, RunError) as err:  # RunError: another rank's failure
            return err
        return None

    def _failed(self, error: Exception, last: bool) -> None:
        if self.policy.on_error == "stop" or last:
            raise SnapshotError(stopped_by_error(error, last)) from error
        self._ctx.warn(f"{error}; training goes on (checkpoint.on_error: continue)")


def write_seconds_of(manifest: Mapping[str, Any]) -> float | None:
    """Seconds the snapshot of `manifest` took to write (from its `write_started` to its
    `created`), else what it recorded of the one before it (`previous_write_seconds`); None
    when it says neither (an older snapshot): unknown."""
    try:
        started = datetime.fromisoformat(manifest["write_started"])
        seconds = (datetime.fromisoformat(manifest["created"]) - started).total_seconds()
    except (KeyError, TypeError, ValueError):
        seconds = None
    if seconds is None or seconds < 0:  # a clock set back meanwhile tells nothing
        seconds = manifest.get("previous_write_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _read_into(path: Path, manifest: dict, like: TrainState) -> TrainState:
    """An unsharded snapshot read straight into `like`'s own tensors (no second copy of the
    state in memory), its `metrics` as the snapshot has them; leaves it lacks (an older
    format's) stay `like`'s. `like` must fit it (`check_fits`)."""
    mine, metrics = like.tensors(), {}

    def into(entry: str, leaf: dict) -> torch.Tensor:
        key = leaf["key"]
        if entry == "metrics":  # whatever a transform put there: the snapshot's own
            metrics[key] = torch.empty(leaf["shape"], dtype=DTYPES[leaf["dtype"]])
            return metrics[key]
        return mine[(entry, *key.split("/")) if key else entry].detach()

    read_into(path, manifest, into)
    found: dict = {}
    for key, t in metrics.items():
        nest(found, key.split("/"), t)
    return like.with_metrics(TensorDict(found, batch_size=[]))


def stopped_by_error(error: Exception, last: bool) -> str:
    """The error a failed snapshot write ends the run with."""
    why = (
        "it was the run's last snapshot"
        if last
        else "checkpoint.on_error is 'stop' ('continue' trains on with a warning)"
    )
    return (
        f"{error}. Training stopped because {why}. Every earlier snapshot is intact: fix the "
        "cause, then continue with functrain resume <recipe> --from latest"
    )


def _check_finite(state: TrainState, path: Path, latest: Path | None) -> bool:
    """Whether `state` has had no step with a non-finite loss or gradients (its stats say,
    one host read); under the state's `nan_policy` "stop" one that has is refused, never
    saved. "skip" states are finite: those steps left params and moments as they were."""
    first = state.stats.get("first_nonfinite", None)
    if first is None or int(first) < 0 or state.static.nan_policy == "skip":
        return True
    if state.static.nan_policy == "stop":
        raise NonFiniteError(int(first), latest, unsaved=path)
    return False


class NoValidSnapshot(RunError):
    """`find("latest")` found no valid snapshot; `skipped`: the invalid ones, oldest first
    (left where they are)."""

    def __init__(self, run: Path, skipped: list[Path]) -> None:
        super().__init__(f"run {run} has no valid snapshot to resume from")
        self.run, self.skipped = run, skipped


class NonFiniteError(RunError):
    """A step's loss or gradients went non-finite under `nan_policy: stop`."""

    def __init__(self, step: int, latest: Path | None, unsaved: Path | None = None) -> None:
        self.step = step
        where = f" ({unsaved.name} is not written)" if unsaved is not None else ""
        then = (
            f"then resume from {latest}, the newest snapshot, all of whose steps came before "
            "it (`functrain resume RECIPE --from latest --allow-change KEY` for a changed key)"
            if latest is not None
            else "then start the run again (it has no snapshot yet)"
        )
        super().__init__(
            f"step {step} gave a non-finite loss or gradients (NaN or inf), and nan_policy is "
            f"'stop': training stopped{where}. Lower the learning rate (optim.lr), add "
            f"clip_by_global_norm, or check the data near that step; {then}. nan_policy: "
            "skip leaves such steps out instead."
        )


def _newest_finite(run_dir: Path) -> Path | None:
    """The newest snapshot whose manifest does not say it went non-finite."""
    for _, path in reversed(list_snapshots(run_dir)):
        try:
            if read_manifest(path).get("finite", True):
                return path.resolve()
        except SnapshotError:
            continue
    return None
