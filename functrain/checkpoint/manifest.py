"""The snapshot manifest: its constants, the versions it records, and the checks a manifest
must pass before any of its numbers is trusted to read a file (whitelisted dtypes, safe file
names, leaves that lie inside their file without overlapping)."""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import io
import math
import os
import platform
import re
import stat
from pathlib import Path
from typing import Any

import orjson
import tensordict
import torch

from functrain.errors import SnapshotError

FORMAT_VERSION: int = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"  # the sha256 of a sealed manifest's bytes
ALIGN = 64
DTYPES = {  # the whitelist: a dtype name in a manifest is only ever looked up here
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    )
    if hasattr(torch, name)
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_REQUIRED = {"format_version": int, "step": int, "created": str, "versions": dict,
             "entries": dict, "files": dict}  # fmt: skip
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.bin")
#: A manifest's `layout`: functrain's own files (default), or torch.distributed.checkpoint's.
LAYOUTS = ("raw", "dcp")
DCP_FILE = re.compile(r"\.metadata|__[0-9]+_[0-9]+\.distcp")
_DAMAGED = "the snapshot is damaged or incomplete — resume from an earlier snapshot"


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


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse and validate `<path>/manifest.json` only; raise SnapshotError on any problem."""
    root = Path(path)
    if not root.is_dir():
        raise SnapshotError(
            f"snapshot directory {root} does not exist; check the path "
            "(list_snapshots(run_dir) shows the snapshots of a run)"
        )
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise SnapshotError(f"{path} is missing, so {root} is not a snapshot; {_DAMAGED}")
    with open_inside(path, "its manifest") as f:
        body = f.readall()
    try:
        manifest = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise SnapshotError(f"{path}: not valid JSON ({e}); {_DAMAGED}") from e
    if isinstance(manifest, dict) and _sealed(root, manifest):
        _check_seal(root, body)
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{path}: not a JSON object; {_DAMAGED}")
    version = manifest.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        versions = manifest.get("versions")
        wrote = versions.get("functrain") if isinstance(versions, dict) else None
        raise SnapshotError(
            f"{path}: format_version {version!r} is not supported (this functrain reads "
            f"{FORMAT_VERSION}); load it with the functrain that wrote it ({wrote or 'unknown'}) "
            "or resume from an earlier snapshot"
        )
    problems = _manifest_problems(manifest)
    if problems:
        raise SnapshotError(f"{path}: {'; '.join(problems)}; {_DAMAGED}")
    return manifest


def open_inside(path: Path, what: str) -> io.FileIO:
    """Open a file of a snapshot for reading: a regular file in the snapshot itself, never a
    symbolic link (which could reach any file of the machine) nor a device or a pipe."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SnapshotError(
            f"{path}: {what} is missing; the snapshot is incomplete — resume from an earlier "
            "snapshot"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotError(
                f"{path}: {what} is a symbolic link; a snapshot's files are regular files "
                "inside it, so this one is not to be trusted — resume from another snapshot"
            ) from None
        raise SnapshotError(f"{path}: cannot open ({e}); check permissions") from e
    f = io.FileIO(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise SnapshotError(
            f"{path}: {what} is not a regular file; the snapshot is not to be trusted — "
            "resume from another snapshot"
        )
    return f


def seal(body: bytes) -> bytes:
    """What `MANIFEST_DIGEST` holds for a manifest of these bytes: their sha256, in hex."""
    return hashlib.sha256(body).hexdigest().encode() + b"\n"


# Fields only a writer that seals its manifests writes: one without `sealed` was edited.
_SEALED_ERA = ("sealed", "finite")


def _sealed(root: Path, manifest: dict) -> bool:
    """Whether the manifest must match a digest: it says so, its digest lies beside it, or it
    carries a field of the writers that seal (removing `sealed` does not switch the check
    off). Manifests from before the seal have none of these and are read as they are."""
    return any(k in manifest for k in _SEALED_ERA) or os.path.lexists(root / MANIFEST_DIGEST)


def _check_seal(root: Path, body: bytes) -> None:
    """A manifest that says it is `sealed` has its digest beside it, which must match: an
    edit of the manifest (its step, its checksums) is caught, not trusted."""
    path = root / MANIFEST_DIGEST
    with open_inside(path, f"the digest of {MANIFEST}") as f:
        found = f.read(256)
    if found != seal(body):
        raise SnapshotError(
            f"{root / MANIFEST} does not match its digest {MANIFEST_DIGEST}: the manifest was "
            f"changed after it was written; {_DAMAGED}"
        )


def _manifest_problems(m: dict) -> list[str]:
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        return [f"missing field(s) {', '.join(missing)}"]
    bad = [k for k, t in _REQUIRED.items() if not isinstance(m[k], t) or isinstance(m[k], bool)]
    if bad:
        return [f"field {k!r} must be a {_REQUIRED[k].__name__}" for k in bad]
    layout = m.get("layout", "raw")
    if layout not in LAYOUTS:
        return [f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)}); upgrade functrain"]
    names = _FILE if layout == "raw" else DCP_FILE
    problems = [
        f"files[{name!r}] is malformed"
        for name, f in m["files"].items()
        if not names.fullmatch(name)
        or not isinstance(f, dict)
        or not (_count(f.get("bytes")) and _count(f.get("crc32")))
    ]
    if problems:
        return problems
    for entry, spec in m["entries"].items():
        found = _entry_problems(spec, m["files"], raw=layout == "raw")
        problems += [f"entries[{entry!r}]: {p}" for p in found]
    return problems


def _entry_problems(spec: Any, files: dict, raw: bool) -> list[str]:
    """A raw entry names its file and where each leaf lies in it; an entry of a DCP
    snapshot lists its leaves' keys, dtypes and whole shapes only."""
    if not isinstance(spec, dict) or not isinstance(spec.get("leaves"), list):
        needs = "'file', 'leaves', 'empty'" if raw else "'leaves', 'empty'"
        return [f"malformed (needs {needs})"]
    if raw and (not isinstance(spec.get("file"), str) or spec["file"] not in files):
        return [f"file {spec.get('file')!r} is not listed in 'files'"]
    empty = spec.get("empty")
    if not isinstance(empty, list) or not all(isinstance(k, str) for k in empty):
        return ["'empty' must be a list of keys"]
    size, end = (files[spec["file"]]["bytes"], 0) if raw else (None, None)
    problems = []
    for i, leaf in enumerate(spec["leaves"]):
        problem = _leaf_problem(leaf, end, size)
        if problem:
            problems.append(f"leaf {i}: {problem}")
        elif raw:
            end = leaf["offset"] + leaf["nbytes"]
    return problems or _tree_problems([leaf["key"] for leaf in spec["leaves"]], empty)


def _leaf_problem(leaf: Any, end: int | None, size: int | None) -> str | None:
    """What is wrong with a leaf record; `end`/`size` None: no file offsets to check (DCP)."""
    if not isinstance(leaf, dict) or not isinstance(leaf.get("key"), str):
        return "malformed"
    if leaf.get("dtype") not in DTYPES:
        return (
            f"unknown dtype {leaf.get('dtype')!r} (known: {', '.join(DTYPES)}); "
            "was it written by a newer functrain? upgrade to load it"
        )
    shape, offset, nbytes = leaf.get("shape"), leaf.get("offset"), leaf.get("nbytes")
    if not (isinstance(shape, list) and all(map(_count, shape))):
        return "malformed shape"
    itemsize = DTYPES[leaf["dtype"]].itemsize
    if nbytes != math.prod(shape) * itemsize:
        return f"nbytes {nbytes!r} does not match shape {shape} of {leaf['dtype']}"
    if end is None or size is None:
        return None
    if not _count(offset):
        return "malformed offset"
    if offset < end or offset % ALIGN:
        return f"offset {offset} overlaps the previous leaf or is not {ALIGN}-byte aligned"
    if offset + nbytes > size:
        return f"bytes {offset}..{offset + nbytes} lie past the end of the {size}-byte file"
    return None


def _tree_problems(keys: list[str], empty: list[str]) -> list[str]:
    if keys == [""] and not empty:
        return []  # the entry is a single tensor
    tree: dict = {}
    for key in keys + empty:
        parts, node = key.split("/"), tree
        if not all(parts):
            return [f"key {key!r} has an empty part"]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if node is None:
                return [f"key {key!r} nests under a leaf"]
        if parts[-1] in node:
            return [f"key {key!r} appears twice or has children"]
        node[parts[-1]] = None
    return []


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def size_problem(path: Path, size: int, want: int) -> str:
    return f"{path}: has {size} bytes but {MANIFEST} says {want} (truncated?); {_DAMAGED}"


def crc_problem(path: Path, got: int, want: int) -> str:
    return (
        f"{path}: checksum mismatch (crc32 {got:08x}, {MANIFEST} says {want:08x}): "
        f"the data is corrupt; {_DAMAGED}"
    )
