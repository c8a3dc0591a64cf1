"""Publishing snapshots on disk, whatever their layout: names, temp dirs, fsync, rename.

A snapshot of step N is the directory `state_N` — this module is the one place that spells
that name. It is written under a temporary name beside it (`.tmp-state_N-<pid>-<hex>`),
every file and the directory fsynced, then renamed into place: the one atomic step. A
temp dir left by a killed process is removed by `clean_partial`; `remove` deletes a
snapshot by renaming it away first, so a listing never shows it half-deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import torch

from functrain.checkpoint.manifest import FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST, seal, versions
from functrain.errors import SnapshotError, size_text

_SNAPSHOT = re.compile(r"state_(\d+)")
_TMP = re.compile(r"\.tmp-.+-(\d+)-[0-9a-f]{8}")


# ---------------------------------------------------------------- names


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the snapshot of `step` lives in a run directory."""
    return Path(run_dir) / f"state_{step}"


def snapshot_step(path: str | os.PathLike) -> int | None:
    """The step of a snapshot directory named `state_<step>`; None for any other name."""
    match = _SNAPSHOT.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_snapshots(run_dir: str | os.PathLike, *, published: bool = True) -> list[tuple[int, Path]]:
    """Snapshots `state_<step>` in `run_dir`, sorted by step: those with a manifest, or with
    `published=False` every directory of that name (one whose manifest is lost included)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = snapshot_step(child)
        if step is None or not child.is_dir() or child.is_symlink():
            continue
        if not published or (child / MANIFEST).is_file():
            found.append((step, child))
    return sorted(found)


def tmp_prefix(name: str) -> str:
    """How the temp dir of the snapshot called `name` begins."""
    return f".tmp-{name}-"


def tmp_name(final: Path) -> Path:
    return final.parent / f"{tmp_prefix(final.name)}{os.getpid()}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------- publishing


def refuse_existing(final: Path) -> None:
    if os.path.lexists(final):
        raise SnapshotError(
            f"snapshot {final} already exists; snapshots are never overwritten — "
            "delete it first or save under another step"
        )


def make_dir(tmp: Path, final: Path) -> None:
    """The temp dir a snapshot is written into, beside where it will be published."""
    if not final.parent.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(final.parent.parent)
    os.mkdir(tmp)


@contextlib.contextmanager
def publishing(
    tmp: Path, final: Path, owner: bool = True, create: bool = False, need: int | None = None
) -> Iterator[None]:
    """Around the writing of `tmp` (made first, with `create`): on any failure it is removed
    (by its `owner`) and nothing is published; an OSError becomes a SnapshotError naming
    the snapshot, the free space and the `need`ed bytes (the snapshot's size)."""
    try:
        if create:
            make_dir(tmp, final)
        with _in_flight(tmp):
            yield
    except BaseException as e:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise SnapshotError(
                f"could not write snapshot {final}: {write_problem(e, final.parent, need)}. "
                "Nothing was published and this process left no temp file — free space or "
                "fix the directory, then save again"
            ) from e
        raise


def write_problem(err: OSError, where: Path, need: int | None = None) -> str:
    """A failed write's OS error, with "the disk is full" when it is, the free space at
    `where` and the bytes it `need`ed."""
    text = f"{err} (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else str(err)
    free = free_bytes(where)
    text += "" if free is None else f"; {size_text(free)} free there"
    return text + ("" if need is None else f", {size_text(need)} needed")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding `path` (None if that cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def _in_flight(path: Path) -> Iterator[None]:
    """Hold a shared lock on the directory `path` (a temp dir being written, or a snapshot
    about to become one) while the body runs, so `clean_partial`, in this process or
    another, leaves it alone. The lock follows the directory through a rename and goes
    with the process: no registry of writes to keep."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # no locks here: the writer's pid still guards it
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _being_written(path: Path) -> bool:
    """Whether some `_in_flight` holds `path` (any process, this one too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True  # gone or unreadable: not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks here: decided by the pid in its name alone
        return False
    finally:
        os.close(fd)
    return False


def rename_into_place(tmp: Path, final: Path) -> None:
    """Publish a complete, fsynced temp dir as `final` (the one atomic step)."""
    if os.path.lexists(final):
        raise SnapshotError(
            f"snapshot {final} appeared while it was being written: another process writes "
            "snapshots into this run directory (a second run or resume of it, or a loop of "
            "your own?); only one may — stop the other, or give this one its own directory"
        )
    os.rename(tmp, final)
    fsync_dir(final.parent)


def write_manifest(tmp: Path, meta: dict[str, Any], entries: dict, files: dict, **extra) -> None:
    """Write `manifest.json` into the snapshot's temp dir, last, and fsync the dir."""
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        **extra,
        "sealed": True,  # its digest lies beside it: `read_manifest` checks the two agree
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "entries": entries,
        "files": files,
    }
    body = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    write_file(tmp / MANIFEST, [memoryview(body)])
    write_file(tmp / MANIFEST_DIGEST, [memoryview(seal(body))])
    fsync_dir(tmp)


def write_file(path: Path, chunks: Iterable[memoryview]) -> None:
    """Create `path` (never overwriting), write every chunk in full, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for data in chunks:
            done = 0
            while done < data.nbytes:
                done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a view of its memory (copied only off-CPU or if not contiguous)."""
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Crc:
    """A running crc32 computed in submission order on a one-thread pool (zlib drops the GIL)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._value = 0
        self._pending: list[Future] = []

    def update(self, data: memoryview) -> None:
        self._pending.append(self._pool.submit(self._step, data))

    def _step(self, data: memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def value(self) -> int:
        for f in self._pending:
            f.result()
        self._pending.clear()
        return self._value


# ---------------------------------------------------------------- cleaning up


def clean_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temp dirs left by interrupted saves; return them.

    Skips the temp dirs of saves still running in this process or in a live process on
    this host (by the pid in the name), so it is safe to call while another save runs.
    """
    root = Path(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        match = _TMP.fullmatch(child.name)
        if not match or not child.is_dir() or _being_written(child):
            continue
        pid = int(match.group(1))  # saves in flight hold a lock: the rest is left over
        if pid != os.getpid() and process_alive(pid):
            continue
        shutil.rmtree(child)
        removed.append(child)
    return removed


def remove(path: str | os.PathLike) -> None:
    """Delete a snapshot: renamed to a temp name first, so it vanishes from listings at once."""
    final = Path(path)
    if not (final / MANIFEST).is_file():
        raise SnapshotError(f"{final} is not a snapshot (no {MANIFEST}); refusing to delete it")
    tmp = tmp_name(final)
    with _in_flight(final):  # the lock goes with the directory to its temp name
        try:
            os.rename(final, tmp)
            fsync_dir(final.parent)
            shutil.rmtree(tmp)
        except OSError as e:
            raise SnapshotError(f"could not delete snapshot {final}: {e}") from e


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (whose temp files to leave alone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
