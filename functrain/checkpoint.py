"""Snapshots: a nested TensorDict of tensors written to a directory and read back.

A snapshot is a directory holding one data file per top-level entry (`<entry>.bin`: the raw
bytes of the entry's leaves in sorted key order, each aligned to 64 bytes) and a
`manifest.json` that says where every leaf lives, its dtype and shape, and a size and crc32
per file. It is written under a temporary name, fsynced and renamed, so a half-written
snapshot is never seen. Loading reads each file into one buffer, checks it, and carves the
leaves out as views; nothing in a snapshot is ever executed (no pickle, whitelisted dtypes).

>>> save("runs/a/state_10", td, {"step": 10})          # doctest: +SKIP
>>> tensors, manifest = load("runs/a/state_10")       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import os
import platform
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import tensordict
import torch
from tensordict import TensorDict, TensorDictBase

from functrain._manifest import (
    _ALIGN,
    _DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    SnapshotError,
    _crc_problem,
    _read_manifest,
    _size_problem,
)

__all__ = [
    "FORMAT_VERSION",
    "SnapshotError",
    "check",
    "clean_partial",
    "digests",
    "list_snapshots",
    "load",
    "read_manifest",
    "remove",
    "save",
    "verify",
    "versions",
]

_CHUNK = 16 << 20  # read granularity: crc32 of one chunk overlaps the read of the next
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_RESERVED = ("format_version", "created", "versions", "entries", "files", "layout")
_SNAPSHOT = re.compile(r"state_(\d+)")
_TMP = re.compile(r"\.tmp-.+-(\d+)-[0-9a-f]{8}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ACTIVE: set[str] = set()  # temp dirs this process is writing right now

Leaves = list[tuple[str, torch.Tensor]]


# ---------------------------------------------------------------- writing


def save(path: str | os.PathLike, tensors: TensorDict, meta: Mapping[str, Any]) -> Path:
    """Write `tensors` (batch_size []) and `meta` (with an int `step`) as a new snapshot.

    Refuses to overwrite. Atomic: on any failure nothing is visible at `path`.
    """
    final = Path(path)
    plan = _plan(tensors)
    meta = _check_meta(meta)
    _refuse_existing(final)
    tmp = _tmp_name(final)
    with _publishing(tmp, final):
        _make_dir(tmp, final)
        _write_snapshot(tmp, plan, meta)
        _rename_into_place(tmp, final)
    return final


def _refuse_existing(final: Path) -> None:
    if os.path.lexists(final):
        raise SnapshotError(
            f"snapshot {final} already exists; snapshots are never overwritten — "
            "delete it first or save under another step"
        )


def _make_dir(tmp: Path, final: Path) -> None:
    """The temp dir a snapshot is written into, beside where it will be published."""
    if not final.parent.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(final.parent.parent)
    os.mkdir(tmp)


@contextlib.contextmanager
def _publishing(tmp: Path, final: Path, owner: bool = True) -> Iterator[None]:
    """Around the writing of `tmp`: on any failure it is removed (by its `owner`) and nothing
    is published; an OSError becomes a SnapshotError naming the snapshot."""
    _ACTIVE.add(os.path.abspath(tmp))
    try:
        yield
    except BaseException as e:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise SnapshotError(
                f"could not write snapshot {final}: {e}; nothing was published — "
                "free space or fix the directory, then save again"
            ) from e
        raise
    finally:
        _ACTIVE.discard(os.path.abspath(tmp))


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Publish a complete, fsynced temp dir as `final` (the one atomic step)."""
    if os.path.lexists(final):
        raise SnapshotError(f"snapshot {final} appeared while it was being written")
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _plan(tensors: TensorDict) -> dict[str, tuple[Leaves, list[str]]]:
    """Entry -> (leaves sorted by key, keys of empty sub-dicts); checks names and leaf types."""
    if not isinstance(tensors, TensorDictBase):
        raise TypeError(f"tensors must be a TensorDict, got {type(tensors).__name__}")
    if tuple(tensors.batch_size) != ():
        raise ValueError(f"tensors must have batch_size [], got {list(tensors.batch_size)}")
    plan = {}
    for entry, value in tensors.items():
        if not isinstance(entry, str) or not _NAME.fullmatch(entry):
            raise ValueError(
                f"entry name {entry!r} is not usable as a file name; use letters, digits, _ . -"
            )
        if isinstance(value, torch.Tensor):
            plan[entry] = ([("", _check_leaf(entry, "", value))], [])
        else:
            leaves: Leaves = []
            empty: list[str] = []
            _walk(entry, value, (), leaves, empty)
            plan[entry] = (sorted(leaves, key=lambda kv: kv[0]), sorted(empty))
    return plan


def _walk(entry: str, td: Any, prefix: tuple, leaves: Leaves, empty: list[str]) -> None:
    where = "/".join(prefix)
    if not isinstance(td, TensorDictBase):
        raise TypeError(
            f"entry {entry!r} key {where!r} holds a {type(td).__name__}; "
            "snapshots hold tensors only — store it as a tensor or in the manifest meta"
        )
    items = list(td.items())
    if not items and prefix:
        empty.append(where)
    for key, value in items:
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"entry {entry!r}: key {key!r} under {where!r} is empty or has '/'")
        if isinstance(value, torch.Tensor):
            leaves.append(("/".join((*prefix, key)), _check_leaf(entry, key, value)))
        else:
            _walk(entry, value, (*prefix, key), leaves, empty)


def _check_leaf(entry: str, key: str, t: torch.Tensor) -> torch.Tensor:
    if t.layout != torch.strided or t.dtype not in _DTYPE_NAMES:
        raise TypeError(
            f"entry {entry!r} leaf {key!r}: {t.dtype} {t.layout} tensors cannot be saved; "
            f"supported dtypes: {', '.join(_DTYPES)} (dense only)"
        )
    return t


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(meta)
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"meta keys {clash} are written by save itself; rename them")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"meta['step'] must be a non-negative int, got {step!r}")
    try:
        orjson.dumps(meta)
    except TypeError as e:
        raise ValueError(
            f"meta is not JSON-serializable: {e}; pass plain str/int/float/list/dict"
        ) from e
    return meta


def _write_snapshot(tmp: Path, plan: dict, meta: dict[str, Any]) -> None:
    entries, files = {}, {}
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for i, (entry, (leaves, empty)) in enumerate(plan.items()):
            name = f"{entry}.bin"
            _test_seam(tmp / name, i)
            records, size, crc = _write_entry(tmp / name, leaves, pool)
            entries[entry] = {"file": name, "leaves": records, "empty": empty}
            files[name] = {"bytes": size, "crc32": crc}
    _test_seam(tmp / MANIFEST, len(plan))
    _write_manifest(tmp, meta, entries, files)


def _write_manifest(tmp: Path, meta: dict[str, Any], entries: dict, files: dict, **extra) -> None:
    """Write `manifest.json` into the snapshot's temp dir, last, and fsync the dir."""
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        **extra,
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "entries": entries,
        "files": files,
    }
    body = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    _write_file(tmp / MANIFEST, [memoryview(body)])
    _fsync_dir(tmp)


#: Tests only: seconds to sleep before each file of a save, so a kill can land mid-save.
_SLOW_SAVE_ENV = "FUNCTRAIN_TEST_SLOW_SAVE"
#: Tests only: `ERRNO[:state_N]` (e.g. `ENOSPC:state_4`) fails that save at its second file.
_SAVE_ERROR_ENV = "FUNCTRAIN_TEST_SAVE_ERROR"


def _test_seam(path: Path, index: int) -> None:
    """Fault injection for the reliability tests; does nothing unless their env vars are set."""
    delay = os.environ.get(_SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))
    fault = os.environ.get(_SAVE_ERROR_ENV)
    if fault and index == 1:
        code, _, snapshot = fault.partition(":")
        if not snapshot or path.parent.name.startswith(f".tmp-{snapshot}-"):
            number = getattr(errno, code)
            raise OSError(number, os.strerror(number), str(path))


def _write_entry(path: Path, leaves: Leaves, pool: ThreadPoolExecutor) -> tuple[list, int, int]:
    """Write one data file while a worker thread checksums the same bytes; fsync it."""
    crc, records, pos = _Crc(pool), [], 0

    def chunks() -> Iterator[memoryview]:
        nonlocal pos
        for key, tensor in leaves:
            offset = -(-pos // _ALIGN) * _ALIGN
            parts = [memoryview(bytes(offset - pos)), _host_bytes(tensor)]
            for part in parts:
                crc.update(part)  # checksummed on the worker while written here
                yield part
            dtype, shape, nbytes = _DTYPE_NAMES[tensor.dtype], list(tensor.shape), parts[1].nbytes
            records.append(dict(key=key, dtype=dtype, shape=shape, offset=offset, nbytes=nbytes))
            pos = offset + nbytes

    _write_file(path, chunks())
    return records, pos, crc.value()


def _write_file(path: Path, chunks: Iterable[memoryview]) -> None:
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


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a view of its memory (copied only off-CPU or if not contiguous)."""
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Crc:
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


def versions() -> dict[str, str]:
    """The versions a manifest records: functrain, torch, tensordict, python."""
    try:
        functrain = importlib.metadata.version("functrain")
    except importlib.metadata.PackageNotFoundError:
        functrain = "unknown"
    python = platform.python_version()
    return dict(
        functrain=functrain,
        torch=torch.__version__,
        tensordict=tensordict.__version__,
        python=python,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse and validate `<path>/manifest.json` only; raise SnapshotError on any problem."""
    return _read_manifest(Path(path))


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TensorDict, dict]:
    """Read a snapshot back as (tensors, manifest), checking every file's size and crc32.

    Leaves are fresh memory (never mapped to the files), views into one buffer per entry.
    A sharded snapshot (`layout: dcp`) is read whole, in this process alone.
    """
    manifest = read_manifest(path)
    device = torch.device(device)
    if manifest.get("layout") == "dcp":
        from functrain import dcp  # it builds on this module

        check(path)
        return dcp.load_whole(path, manifest).to(device), manifest
    out = {entry: _unflatten(buf, spec, device) for entry, spec, buf in _entries(path, manifest)}
    return TensorDict(out, batch_size=[]), manifest


def _entries(path: str | os.PathLike, manifest: dict) -> Iterator[tuple[str, dict, torch.Tensor]]:
    """(entry, its manifest spec, its checked file contents) for every entry, one at a time."""
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for entry, spec in manifest["entries"].items():
            want = manifest["files"][spec["file"]]
            yield entry, spec, _read_file(Path(path) / spec["file"], want, pool)


def _read_file(path: Path, want: dict, pool: ThreadPoolExecutor, keep: bool = True) -> torch.Tensor:
    """A data file as a uint8 tensor, after checking its size and crc32 against `want`.

    With keep=False only the checks are made, streaming through one reusable chunk.
    """
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, errors mapped
    except FileNotFoundError:
        raise SnapshotError(
            f"{path}: data file listed in {MANIFEST} is missing; the snapshot is incomplete — "
            "resume from an earlier snapshot"
        ) from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open ({e}); check permissions") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != want["bytes"]:
            raise SnapshotError(_size_problem(path, size, want["bytes"]))
        buf = torch.empty(size if keep else min(size, _CHUNK), dtype=torch.uint8)
        view = memoryview(buf.numpy())
        crc, pos = _Crc(pool), 0
        while pos < size:
            part = view[pos : pos + _CHUNK] if keep else view[: size - pos]
            n = f.readinto(part)
            if not n:
                raise SnapshotError(_size_problem(path, pos, want["bytes"]))
            crc.update(part[:n])  # overlaps the next read when keeping the data
            if not keep:
                crc.value()  # the chunk is about to be overwritten
            pos += n
    got = crc.value()
    if got != want["crc32"]:
        raise SnapshotError(_crc_problem(path, got, want["crc32"]))
    return buf


def _unflatten(buf: torch.Tensor, spec: dict, device: torch.device) -> Any:
    """Carve an entry's leaves out of its file buffer (views, `.view(dtype)` via uint8)."""
    tree: dict[str, Any] = {}
    for key in spec["empty"]:
        _nest(tree, key.split("/"), {})
    for leaf in spec["leaves"]:
        dtype = _DTYPES[leaf["dtype"]]
        start, nbytes = leaf["offset"], leaf["nbytes"]
        if nbytes:
            t = buf[start : start + nbytes].view(dtype).view(leaf["shape"])
        else:
            t = torch.empty(leaf["shape"], dtype=dtype)
        if device.type != "cpu":
            t = t.to(device)
        if leaf["key"] == "":
            return t
        _nest(tree, leaf["key"].split("/"), t)
    return tree


def _nest(tree: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree.setdefault(parts[-1], value)


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem found in a snapshot (manifest, sizes, checksums); [] when it is valid."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except SnapshotError as e:
        return [str(e)]
    problems = []
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for name, want in manifest["files"].items():
            try:
                _read_file(root / name, want, pool, keep=False)
            except SnapshotError as e:
                problems.append(str(e))
    return problems


def check(path: str | os.PathLike) -> None:
    """Raise SnapshotError with the first problem `verify` finds; return if there is none."""
    problems = verify(path)
    if problems:
        raise SnapshotError(problems[0])


def digests(path: str | os.PathLike) -> dict[str, str]:
    """Top-level entry -> sha256 hex over its leaf keys, dtypes, shapes and bytes.

    Independent of file layout, so equal contents give equal digests across snapshots
    (a sharded snapshot and an unsharded one included).
    """
    manifest = read_manifest(path)
    if manifest.get("layout") == "dcp":
        whole = load(path)[0]
        return {
            entry: _digest(spec, lambda leaf, e=entry: _leaf_bytes(whole, e, leaf["key"]))
            for entry, spec in manifest["entries"].items()
        }
    out = {}
    for entry, spec, buf in _entries(path, manifest):
        view = memoryview(buf.numpy())
        out[entry] = _digest(
            spec, lambda leaf, v=view: v[leaf["offset"] : leaf["offset"] + leaf["nbytes"]]
        )
    return out


def _digest(spec: dict, data) -> str:
    h = hashlib.sha256()
    for key in spec["empty"]:
        h.update(f"empty\0{key}\n".encode())
    for leaf in spec["leaves"]:
        h.update(f"leaf\0{leaf['key']}\0{leaf['dtype']}\0{leaf['shape']}\n".encode())
        h.update(data(leaf))
    return h.hexdigest()


def _leaf_bytes(tensors: TensorDict, entry: str, key: str) -> memoryview:
    t = tensors[(entry, *key.split("/"))] if key else tensors[entry]
    return _host_bytes(t)


# ---------------------------------------------------------------- manifest checks


# ---------------------------------------------------------------- run directories


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published snapshots `state_<step>` (with a manifest) in `run_dir`, sorted by step."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _SNAPSHOT.fullmatch(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


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
        if not match or not child.is_dir() or os.path.abspath(child) in _ACTIVE:
            continue
        pid = int(match.group(1))  # our own saves in flight are in _ACTIVE: the rest is left over
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
    tmp = _tmp_name(final)
    _ACTIVE.add(os.path.abspath(tmp))
    try:
        os.rename(final, tmp)
        _fsync_dir(final.parent)
        shutil.rmtree(tmp)
    except OSError as e:
        raise SnapshotError(f"could not delete snapshot {final}: {e}") from e
    finally:
        _ACTIVE.discard(os.path.abspath(tmp))


def _tmp_name(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"


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
