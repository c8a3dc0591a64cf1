"""The raw snapshot layout: a nested TensorDict of tensors written to a directory and read back.

A snapshot is a directory holding one data file per top-level entry (`<entry>.bin`: the raw
bytes of the entry's leaves in sorted key order, each aligned to 64 bytes) and a
`manifest.json` that says where every leaf lives, its dtype and shape, and a size and crc32
per file. It is published through `_files` (temp name, fsync, rename), so a half-written
snapshot is never seen. Loading reads each file into one buffer, checks it, and carves the
leaves out as views; nothing in a snapshot is ever executed (no pickle, whitelisted dtypes).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import torch
from tensordict import TensorDict, TensorDictBase

from functrain.checkpoint import _files, faults
from functrain.checkpoint.manifest import (
    ALIGN,
    DTYPE_NAMES,
    DTYPES,
    MANIFEST,
    crc_problem,
    open_inside,
    size_problem,
)
from functrain.errors import SnapshotError

_CHUNK = 16 << 20  # read granularity: crc32 of one chunk overlaps the read of the next
_RESERVED = ("format_version", "created", "versions", "entries", "files", "layout", "sealed")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

Leaves = list[tuple[str, torch.Tensor]]


# ---------------------------------------------------------------- writing


def save(path: str | os.PathLike, tensors: TensorDict, meta: Mapping[str, Any]) -> Path:
    """Write `tensors` (batch_size []) and `meta` (with an int `step`) as a new snapshot.

    Refuses to overwrite. Atomic: on any failure nothing is visible at `path`.
    """
    final = Path(path)
    plan = plan_of(tensors)
    meta = check_meta(meta)
    _files.refuse_existing(final)
    tmp = _files.tmp_name(final)
    need = sum(t.numel() * t.element_size() for leaves, _ in plan.values() for _, t in leaves)
    with _files.publishing(tmp, final, create=True, need=need):
        _write_snapshot(tmp, plan, meta)
        _files.rename_into_place(tmp, final)
    return final


def plan_of(tensors: TensorDict) -> dict[str, tuple[Leaves, list[str]]]:
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
    if t.layout != torch.strided or t.dtype not in DTYPE_NAMES:
        raise TypeError(
            f"entry {entry!r} leaf {key!r}: {t.dtype} {t.layout} tensors cannot be saved; "
            f"supported dtypes: {', '.join(DTYPES)} (dense only)"
        )
    return t


def check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
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
            faults.inject(tmp / name, i)  # test-only: a no-op unless asked for
            records, size, crc = _write_entry(tmp / name, leaves, pool)
            entries[entry] = {"file": name, "leaves": records, "empty": empty}
            files[name] = {"bytes": size, "crc32": crc}
    faults.inject(tmp / MANIFEST, len(plan))
    _files.write_manifest(tmp, meta, entries, files)


def _write_entry(path: Path, leaves: Leaves, pool: ThreadPoolExecutor) -> tuple[list, int, int]:
    """Write one data file while a worker thread checksums the same bytes; fsync it."""
    crc, records, pos = _files.Crc(pool), [], 0

    def chunks() -> Iterator[memoryview]:
        nonlocal pos
        for key, tensor in leaves:
            offset = -(-pos // ALIGN) * ALIGN
            parts = [memoryview(bytes(offset - pos)), _files.host_bytes(tensor)]
            for part in parts:
                crc.update(part)  # checksummed on the worker while written here
                yield part
            dtype, shape, nbytes = DTYPE_NAMES[tensor.dtype], list(tensor.shape), parts[1].nbytes
            records.append(dict(key=key, dtype=dtype, shape=shape, offset=offset, nbytes=nbytes))
            pos = offset + nbytes

    _files.write_file(path, chunks())
    return records, pos, crc.value()


# ---------------------------------------------------------------- reading


def read(path: str | os.PathLike, manifest: dict, device: torch.device) -> TensorDict:
    """The entries of a raw snapshot whose `manifest` was read, every file checked as read.

    Leaves are fresh memory (never mapped to the files), views into one buffer per entry.
    """
    out = {entry: _unflatten(buf, spec, device) for entry, spec, buf in _entries(path, manifest)}
    return TensorDict(out, batch_size=[])


def _entries(path: str | os.PathLike, manifest: dict) -> Iterator[tuple[str, dict, torch.Tensor]]:
    """(entry, its manifest spec, its checked file contents) for every entry, one at a time."""
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for entry, spec in manifest["entries"].items():
            want = manifest["files"][spec["file"]]
            yield entry, spec, _read_file(Path(path) / spec["file"], want, pool)


def _read_file(
    path: Path, want: dict, pool: ThreadPoolExecutor, keep: bool = True
) -> torch.Tensor | None:
    """A data file as a uint8 tensor, after checking its size and crc32 against `want`.

    With keep=False only the checks are made, streaming through one reusable chunk.
    """
    crc, buf = _files.Crc(pool), None
    with _opened(path, want) as f:
        if keep:
            buf = torch.empty(want["bytes"], dtype=torch.uint8)
            _fill(f, path, crc, 0, memoryview(buf.numpy()), want["bytes"])
        else:
            _skip(f, path, crc, 0, want["bytes"])
    _check_crc(path, crc, want)
    return buf


def read_into(
    path: str | os.PathLike, manifest: dict, into: Callable[[str, dict], torch.Tensor]
) -> None:
    """Read every leaf straight into `into(entry, leaf)` (`leaf`: its manifest record), a
    tensor of the leaf's dtype and shape: into its memory when it is a contiguous CPU
    tensor (no second copy of the snapshot), else through a buffer of that one leaf. Each
    file's size and crc32 are checked as it is read; a bad one raises SnapshotError, part
    of it already written."""
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for entry, spec in manifest["entries"].items():
            want = manifest["files"][spec["file"]]
            name = Path(path) / spec["file"]
            crc, pos = _files.Crc(pool), 0
            with _opened(name, want) as f:
                for leaf in sorted(spec["leaves"], key=lambda x: x["offset"]):
                    pos = _skip(f, name, crc, pos, leaf["offset"])
                    t = into(entry, leaf)
                    direct = t.device.type == "cpu" and t.is_contiguous()
                    buf = t if direct else torch.empty(t.shape, dtype=t.dtype)
                    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
                    pos = _fill(f, name, crc, pos, view, want["bytes"])
                    if not direct:
                        crc.value()  # the buffer is read by the copy below
                        t.copy_(buf)
                _skip(f, name, crc, pos, want["bytes"])
            _check_crc(name, crc, want)


def _opened(path: Path, want: dict) -> Any:
    """A data file of a snapshot, open for reading, once its size is the manifest's."""
    f = open_inside(path, f"data file listed in {MANIFEST}")
    size = os.fstat(f.fileno()).st_size
    if size != want["bytes"]:
        f.close()
        raise SnapshotError(size_problem(path, size, want["bytes"]))
    return f


def _check_crc(path: Path, crc: _files.Crc, want: dict) -> None:
    if (got := crc.value()) != want["crc32"]:
        raise SnapshotError(crc_problem(path, got, want["crc32"]))


def _fill(f: Any, name: Path, crc: Any, pos: int, view: memoryview, total: int) -> int:
    """Read len(view) bytes of `f` into `view`, adding them to `crc` (computed while the
    next part is read: `view` must stay as it is); the new position."""
    done = 0
    while done < len(view):
        part = view[done : done + _CHUNK]
        n = f.readinto(part)
        if not n:
            raise SnapshotError(size_problem(name, pos + done, total))
        crc.update(part[:n])
        done += n
    return pos + done


def _skip(f: Any, name: Path, crc: Any, pos: int, to: int) -> int:
    """Read (and checksum) the bytes of `f` from `pos` up to `to` through one reused chunk:
    gaps between leaves, or a whole file that is only checked."""
    scratch = memoryview(bytearray(min(_CHUNK, max(to - pos, 0))))
    while pos < to:
        pos = _fill(f, name, crc, pos, scratch[: to - pos], to)
        crc.value()  # the chunk is about to be overwritten
    return pos


def _unflatten(buf: torch.Tensor, spec: dict, device: torch.device) -> Any:
    """Carve an entry's leaves out of its file buffer (views, `.view(dtype)` via uint8)."""
    tree: dict[str, Any] = {}
    for key in spec["empty"]:
        nest(tree, key.split("/"), {})
    for leaf in spec["leaves"]:
        dtype = DTYPES[leaf["dtype"]]
        start, nbytes = leaf["offset"], leaf["nbytes"]
        if nbytes:
            t = buf[start : start + nbytes].view(dtype).view(leaf["shape"])
        else:
            t = torch.empty(leaf["shape"], dtype=dtype)
        if device.type != "cpu":
            t = t.to(device)
        if leaf["key"] == "":
            return t
        nest(tree, leaf["key"].split("/"), t)
    return tree


def nest(tree: dict, parts: list[str], value: Any) -> None:
    """Put `value` at `parts` in a tree of dicts (an existing value stays)."""
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree.setdefault(parts[-1], value)


def file_problems(
    path: str | os.PathLike, manifest: dict, part: tuple[int, int] = (0, 1)
) -> list[str]:
    """Every file of the manifest (any layout) whose size or crc32 is off; [] when all match.
    `part=(i, n)`: only the files i, i + n, ... of the manifest's list (ranks share a check)."""
    root, problems = Path(path), []
    i, n = part
    with ThreadPoolExecutor(1, thread_name_prefix="functrain-crc") as pool:
        for name, want in list(manifest["files"].items())[i::n]:
            try:
                _read_file(root / name, want, pool, keep=False)
            except SnapshotError as e:
                problems.append(str(e))
    return problems


def digests(path: str | os.PathLike, manifest: dict) -> dict[str, str]:
    """Entry -> `digest` of a raw snapshot, each file checked as read."""
    out = {}
    for entry, spec, buf in _entries(path, manifest):
        view = memoryview(buf.numpy())
        out[entry] = digest(
            spec, lambda leaf, v=view: v[leaf["offset"] : leaf["offset"] + leaf["nbytes"]]
        )
    return out


def digest(spec: dict, data: Callable[[dict], memoryview]) -> str:
    """sha256 over an entry's leaf keys, dtypes, shapes and bytes (`data(leaf)`): independent
    of the file layout, so equal contents give equal digests across snapshots."""
    h = hashlib.sha256()
    for key in spec["empty"]:
        h.update(f"empty\0{key}\n".encode())
    for leaf in spec["leaves"]:
        h.update(f"leaf\0{leaf['key']}\0{leaf['dtype']}\0{leaf['shape']}\n".encode())
        h.update(data(leaf))
    return h.hexdigest()


def leaf_bytes(tensors: TensorDict, entry: str, key: str) -> memoryview:
    t = tensors[(entry, *key.split("/"))] if key else tensors[entry]
    return _files.host_bytes(t)
