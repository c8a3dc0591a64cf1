"""Run directories: create them, tidy them, keep `metrics.jsonl` in step with the snapshots.

runs/<name>/recipe.yaml  metrics.jsonl  state_<step>/  .lock (the owner: `lock_run`)

The snapshots inside are `functrain.checkpoint.Snapshots`'s business; this module keeps the
rest of the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from functrain import checkpoint
from functrain.distributed import Context
from functrain.errors import RunError, warn
from functrain.recipe import Recipe, dump_yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"  # held by the run training into the directory (`lock_run`)


def run_path(recipe: Recipe) -> Path:
    return Path(recipe.out_dir) / recipe.name


def create_run(
    recipe: Recipe,
    path: Path,
    *,
    metrics: bytes = b"",
    held: RunLock | None = None,
    restart: bool = False,
) -> RunLock:
    """Make the run directory with its resolved recipe and own it (the returned lock, or
    `held`, which the caller took already). `mkdir` decides atomically who makes it; an
    existing one is refused unless it holds no history (no snapshot, no metrics: a start
    that failed, e.g. on a full disk), which is reused — with `restart` (auto-resume) also
    one whose run logged metrics but died before its first snapshot: they start afresh."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        made = True
    except FileExistsError:
        made = False
    except OSError as err:
        raise RunError(f"cannot make the run directory {path}: {err.strerror or err}") from err
    try:
        owner = held or lock_run(path)
    except RunError as err:
        if made and not isinstance(err, InUseError):  # ours, and nothing in it: leave none
            shutil.rmtree(path, ignore_errors=True)
        raise
    try:
        if not made:
            _refuse_history(path, restart)
        write_atomic(path / RECIPE_FILE, dump_yaml(recipe).encode())
        write_atomic(path / METRICS_FILE, metrics)
    except BaseException:
        if made:  # nothing of it is worth keeping: no half-made run directory is left
            shutil.rmtree(path, ignore_errors=True)
        if held is None:
            owner.release()
        raise
    return owner


_LEFTOVERS = (LOCK_FILE, RECIPE_FILE)  # what a start that wrote no step may leave


def has_snapshots(path: Path) -> bool:
    """Whether the run directory holds any snapshot (valid or not: `resume` sorts them)."""
    return bool(checkpoint.list_snapshots(path, published=False))


def _refuse_history(path: Path, restart: bool = False) -> None:
    """Refuse a run directory that holds anything but what a failed start leaves; with
    `restart` (auto-resume, which found no snapshot) any that holds no snapshot."""
    if not path.is_dir():
        raise RunError(f"{path} exists and is not a directory: pick another name (name=NEW)")
    clean_partial(path)  # temp files and snapshot temp dirs of writers that died
    if restart and not has_snapshots(path):
        return
    metrics = path / METRICS_FILE
    others = [p.name for p in path.iterdir() if p.name not in (*_LEFTOVERS, METRICS_FILE)]
    if others and checkpoint.list_snapshots(path):
        raise RunError(
            f"run directory {path} already exists. To continue it: functrain resume "
            f"<recipe> --from latest. To start afresh, pick another name (name=NEW) or "
            f"remove the directory."
        )
    if others or (metrics.is_file() and metrics.stat().st_size):
        raise RunError(
            f"run directory {path} already exists and holds no snapshot to resume from (only "
            f"{', '.join(sorted(others)) or METRICS_FILE}: a run that stopped before its first "
            "snapshot?). Look at it, then remove the directory, or pick another name "
            "(name=NEW)."
        )


class InUseError(RunError):
    """The run directory is owned by another live run."""


class RunLock:
    """Ownership of a run directory: an exclusive `flock` on its `.lock` file, held open
    for the life of the run (a crashed owner's lock goes with its process, so a stale one is
    taken over by the next). The file names the owner (host, pid, start) for the refusal."""

    def __init__(self, fd: int | None, path: Path, nonce: str) -> None:
        self._fd, self.path, self.nonce = fd, path, nonce

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run(path: Path) -> RunLock:
    """Own the existing run directory `path`, or raise a RunError naming its owner. On a
    file system without working locks, warn and refuse only a live owner on this host."""
    file = path / LOCK_FILE
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise RunError(f"cannot open {file} to own the run: {err.strerror or err}") from err
    try:
        _flock(fd)
    except BlockingIOError:
        owner = _owner(fd)
        os.close(fd)
        raise InUseError(_in_use(path, owner)) from None
    except OSError as err:  # e.g. ENOLCK on a network file system without a lock service
        owner = _owner(fd)
        alive = owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid()
        if alive and checkpoint.process_alive(int(owner.get("pid", 0))):
            os.close(fd)
            raise InUseError(_in_use(path, owner)) from None
        warn(
            f"cannot lock {file} ({err.strerror or err}): this file system does not keep "
            "locks, so functrain cannot stop a second run or resume on other hosts from "
            "writing into this run directory at the same time; make sure only one does"
        )
    nonce = secrets.token_hex(8)  # what the other ranks must read here (`check_shared`)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(),
              "argv": sys.argv, "nonce": nonce}  # fmt: skip
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(record), 0)
        os.fsync(fd)  # other nodes read it (`check_shared`): NFS shows it once it is synced
    except OSError as err:
        os.close(fd)
        raise RunError(io_problem(file, err, len(orjson.dumps(record)))) from err
    return RunLock(fd, path, nonce)


def check_shared(ctx: Context, path: Path, owner: RunLock | None) -> None:
    """Every rank must see the run directory rank 0 owns: each reads the nonce rank 0 wrote
    into its `.lock` (a collective). Ranks on node-local disks would each write their own
    shards or read other snapshots: refused before any step, naming rank, host and path."""
    if ctx.world_size == 1:
        return
    nonce, host = ctx.share((owner.nonce, socket.gethostname()) if owner else (None, None))
    if nonce is None:
        return

    def sees() -> None:
        end = time.monotonic() + 10  # network file systems may show the write late
        while (seen := _nonce_in(path)) != nonce and time.monotonic() < end:
            time.sleep(0.2)
        if seen != nonce:
            raise RunError(
                f"rank {ctx.rank} on host {socket.gethostname()} does not see the run "
                f"directory {path.resolve()} that rank 0 on host {host} writes: every rank "
                "must see the same run directory (snapshots are written by several ranks "
                "and read by all). Put out_dir on storage every node shares."
            )

    ctx.all_ok(sees)


def _flock(fd: int) -> None:
    """Take the lock, or raise BlockingIOError. An owner that died may still hold it for a
    few seconds through the data-loader workers it forked (they share the open file): when
    the recorded owner on this host is dead, wait for them to go."""
    end = time.monotonic() + 20
    while True:
        try:
            return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            mine = owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
            if not (mine and not checkpoint.process_alive(owner["pid"])):
                raise
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def _nonce_in(path: Path) -> str | None:
    try:
        return orjson.loads((path / LOCK_FILE).read_bytes()).get("nonce")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None


def _owner(fd: int) -> dict:
    try:
        return orjson.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, orjson.JSONDecodeError):
        return {}


def _in_use(path: Path, owner: dict) -> str:
    who = (
        f"pid {owner['pid']} on host {owner.get('host', '?')} (since {owner.get('since', '?')})"
        if "pid" in owner
        else "another process"
    )
    return (
        f"run directory {path} is in use by {who}: one run at a time may train into it, or "
        "their snapshots and metrics would overwrite each other. Wait for it to end or stop "
        "it; to try something else meanwhile, branch: functrain resume <recipe> --from "
        "latest --name NEW."
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temp file and a rename; on failure (a full disk)
    no temp file is left and a RunError names the path and the space it needed."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunError(io_problem(path, err, len(content))) from err


def io_problem(
    path: Path, err: OSError, need: int, then: str = "run the same command again"
) -> str:
    """One paragraph on a failed write of `need` bytes to `path`."""
    return (
        f"could not write {path}: {checkpoint.write_problem(err, path.parent, need)}. Nothing "
        "was left half-written; free space (or point out_dir elsewhere), or fix the "
        f"directory, and {then}."
    )


def metrics_until(path: Path, step: int) -> bytes:
    """The lines of `metrics.jsonl` up to and including `step` (none after: no orphans)."""
    if not path.exists():
        return b""
    kept = [  # a torn last line (a writer killed mid-line) has no newline: dropped
        line
        for line in path.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n") and line.strip() and orjson.loads(line)["step"] <= step
    ]
    return b"".join(kept)


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a last line still being written is left out."""
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    if lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # a run appending right now: its record is not whole yet
    return [orjson.loads(line) for line in lines]


def cut_metrics(path: Path, step: int) -> None:
    write_atomic(path, metrics_until(path, step))


_TMP_FILE = re.compile(rf"\.tmp-(?:{re.escape(RECIPE_FILE)}|{re.escape(METRICS_FILE)})-(\d+)")


def clean_partial(run: Path) -> list[Path]:
    """Remove what interrupted writes left in `run` (snapshot temp dirs, temp files of
    `write_atomic`) by processes no longer alive; return what was removed."""
    removed = checkpoint.clean_partial(run)
    for p in _dead_tmp_files(run):
        p.unlink()
        removed.append(p)
    return removed


def _dead_tmp_files(run: Path) -> list[Path]:
    """The temp files of `write_atomic` in `run` whose writer is no longer alive."""
    found = []
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        match = _TMP_FILE.fullmatch(p.name)
        pid = int(match.group(1)) if match else 0
        if match and p.is_file() and pid != os.getpid() and not checkpoint.process_alive(pid):
            found.append(p)
    return found


def set_aside(snapshot: Path) -> Path:
    """Rename an invalid snapshot to `state_N.invalid[.K]`: kept for a look, never listed."""
    target, k = snapshot.with_name(snapshot.name + ".invalid"), 1
    while target.exists():
        k += 1
        target = snapshot.with_name(f"{snapshot.name}.invalid.{k}")
    os.rename(snapshot, target)
    return target
