"""The sharded snapshot layout (FSDP2 states), through torch.distributed.checkpoint.

The directory keeps the contract of the raw layout: a `manifest.json` (with
`"layout": "dcp"`) lists every file with its size and crc32, and every leaf with its dtype
and whole shape. Beside it lie DCP's files: `.metadata` and one `__<rank>_0.distcp` per
rank. Every rank writes its own rows into one temporary directory; once all have written,
rank 0 checksums the files, writes the manifest, fsyncs and renames: a snapshot is
published whole or not at all. Any number of ranks can read it back (DCP reshards), and
one process without a process group can read it whole (`checkpoint.load` does).

DCP pickles its `.metadata`; functrain reads it with an unpickler that only builds the
globals such a file holds, each named exactly (DCP's metadata classes, torch sizes, the
whitelisted dtypes), after a scan of its opcodes; and it refuses metadata that would have
DCP unpickle more (a bytes item, read with `torch.load(weights_only=False)`) or read a
file outside the snapshot. A snapshot still runs no code.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import re
import stat
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as td
import torch.distributed.checkpoint as dist_cp
from tensordict import TensorDict

from functrain.checkpoint import _files, faults, raw
from functrain.checkpoint.manifest import DCP_FILE, DTYPE_NAMES, DTYPES, MANIFEST, open_inside
from functrain.errors import SnapshotError

_CHUNK = 16 << 20


class Sharded(Protocol):
    """What DCP needs of a sharded state's layout (`functrain.distributed.fsdp.Sharding` has it)."""

    def views(self, tensors: TensorDict, mesh: Any = None) -> dict[str, torch.Tensor]:
        """`entry/key` -> a DTensor view of each shard (no copy), the plain tensor otherwise."""
        ...

    def global_meta(self, tensors: TensorDict) -> TensorDict:
        """The entries as tensors of their whole shapes."""
        ...


def save(
    path: str | os.PathLike,
    tensors: TensorDict,
    meta: Mapping[str, Any],
    *,
    sharding: Sharded,
    group: Any = None,
    mesh: Any = None,
) -> Path:
    """Write a sharded state's `tensors` (this rank's shards, or a staged copy of them) and
    `meta` as the snapshot `path` — a collective: every rank calls it.

    Collectives run on `group` (default: the default group), DTensor views on `mesh`
    (default: the model's). Refuses to overwrite; on any failure nothing is visible at
    `path`, on every rank.
    """
    final, meta = Path(path), raw.check_meta(meta)
    main = td.get_rank() == 0
    box: list[Any] = [_make_tmp(final) if main else None]
    td.broadcast_object_list(box, src=0, group=group)  # the temp dir, or why there is none
    if isinstance(box[0], str):
        raise SnapshotError(box[0])
    tmp = box[0]
    with _files.publishing(tmp, final, owner=main):
        writer = dist_cp.FileSystemWriter(tmp, sync_files=True)
        views = sharding.views(tensors, mesh)
        dist_cp.save(views, storage_writer=writer, process_group=group)  # each rank, its rows
        if main:
            _publish(tmp, final, sharding.global_meta(tensors), meta)
    return final


def async_writer(sharding: Sharded) -> Callable[..., Path]:
    """`save` for `AsyncWriter(write=...)`: on a gloo process group of its own, so
    the writer thread's collectives never interleave with the training step's (a collective:
    every rank creates the group)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = td.new_group(backend="gloo")
    mesh = DeviceMesh.from_group(group, device_type="cpu")  # the staged copies are on the host
    return functools.partial(save, sharding=sharding, group=group, mesh=mesh)


def _make_tmp(final: Path) -> Path | str:
    """Rank 0: the new temp dir for `final`, or a message saying why there is none."""
    tmp = _files.tmp_name(final)
    try:
        _files.refuse_existing(final)
        _files.make_dir(tmp, final)
    except SnapshotError as e:
        return str(e)
    except OSError as e:
        return f"could not write snapshot {final}: {e}; free space or fix the directory"
    return tmp


def _publish(tmp: Path, final: Path, whole: TensorDict, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote: checksum DCP's files, write the manifest, rename."""
    faults.inject(tmp / MANIFEST, 0)  # test-only: a no-op unless asked for
    files = {}
    for name in sorted(os.listdir(tmp)):
        if not DCP_FILE.fullmatch(name):
            raise SnapshotError(f"torch.distributed.checkpoint wrote an unexpected file {name}")
        files[name] = _checksum(tmp / name)
    listed = {
        getattr(v, "relative_path", None)
        for v in _unpickle(tmp / ".metadata").storage_data.values()
    }
    missing = sorted(str(n) for n in listed if n not in files)
    if missing:  # a rank wrote its shards where rank 0 cannot see them
        raise SnapshotError(
            f"snapshot {final}: the shard file(s) {', '.join(missing)} that other ranks wrote "
            "are not in the directory rank 0 sees, so nothing was published: the ranks do "
            "not share the run directory. Put out_dir on storage every node shares."
        )
    entries = {}
    for entry, (leaves, empty) in raw.plan_of(whole).items():
        records = [
            dict(key=k, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), nbytes=_nbytes(t))
            for k, t in leaves
        ]
        entries[entry] = {"leaves": records, "empty": empty}
    _files.write_manifest(tmp, meta, entries, files, layout="dcp")
    _files.rename_into_place(tmp, final)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _checksum(path: Path) -> dict[str, int]:
    """Size and crc32 of a file another process wrote; fsynced again to be sure it is down."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": crc}


def load_whole(path: str | os.PathLike, manifest: dict) -> TensorDict:
    """Every entry, whole, read in this process alone (no process group needed)."""
    tree, flat = _skeleton(manifest, "cpu")
    read_metadata(path)  # DCP would wrap a refusal in errors of its own: refuse first
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dist_cp.load(flat, storage_reader=_Reader(path), no_dist=True)
    return tree


def skeleton(manifest: dict) -> TensorDict:
    """Meta tensors shaped as the manifest says, nested by entry (to check a state fits)."""
    return _skeleton(manifest, "meta")[0]


def read_shards(path: str | os.PathLike, tensors: TensorDict, sharding: Sharded) -> None:
    """Read the snapshot into a sharded state's `tensors` in place (a collective: all ranks):
    each rank reads only its rows. Check first that the state fits `skeleton(manifest)`."""
    dist_cp.load(sharding.views(tensors), storage_reader=_Reader(path))


def _skeleton(manifest: dict, device: str) -> tuple[TensorDict, dict[str, torch.Tensor]]:
    """Empty tensors shaped as the manifest says: nested by entry, and flat by DCP key."""
    tree: dict[str, Any] = {}
    flat: dict[str, torch.Tensor] = {}
    for entry, spec in manifest["entries"].items():
        for key in spec["empty"]:
            raw.nest(tree, [entry, *key.split("/")], {})
        for leaf in spec["leaves"]:
            t = torch.empty(leaf["shape"], dtype=DTYPES[leaf["dtype"]], device=device)
            name = "/".join(p for p in (entry, leaf["key"]) if p)
            flat[name] = t
            raw.nest(tree, name.split("/"), t)
        tree.setdefault(entry, {})
    return TensorDict(tree, batch_size=[]), flat


_DCP_META = "torch.distributed.checkpoint.metadata"
#: Every global the `.metadata` of a functrain snapshot holds, by exact (module, name), as
#: found by saving one (DCP's own pickle.dump). BytesStorageMetadata is left out on purpose:
#: functrain saves tensors only, and DCP reads a bytes item with torch.load(weights_only=
#: False), which runs whatever pickle the shard file holds.
_ALLOWED = frozenset(
    {
        (_DCP_META, "Metadata"),
        (_DCP_META, "MetadataIndex"),
        (_DCP_META, "StorageMeta"),
        (_DCP_META, "TensorStorageMetadata"),
        (_DCP_META, "TensorProperties"),
        (_DCP_META, "ChunkStorageMetadata"),
        (_DCP_META, "_MEM_FORMAT_ENCODING"),  # TensorProperties' memory_format
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.strided, pickled by name
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"),  # Python 3.13 names its home module
        ("pathlib._local", "PurePosixPath"),
        *(("torch", name) for name in DTYPES),
    }
)
#: Opcodes DCP never writes: objects from outside the pickle (persistent ids, out-of-band
#: buffers) and the copyreg extension registry.
_REFUSED_OPCODES = {"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
#: A memo slot given by number: the unpickler allocates up to it (a 4-byte index asks for GiBs).
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_SHARD_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")
_UNTRUSTED = "the file is not to be trusted; resume from another snapshot"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other global is refused.

    `name` is matched whole: protocol 4 resolves a dotted name attribute by attribute
    (`os.system` through a module that imports os), so no name with a dot is ever looked up.
    """

    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(io.BytesIO(data))  # in memory: a bad length asks no allocation
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise SnapshotError(
            f"{self.file} refers to {module}.{name}, which a torch.distributed.checkpoint "
            f"snapshot never holds; {_UNTRUSTED}"
        )


def _scan(data: bytes) -> str | None:
    """Why the pickle `data` is refused before any of it is unpickled, or None."""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in _REFUSED_OPCODES:
            return f"the pickle opcode {opcode.name}"
        if opcode.name in _MEMO_PUTS and not 0 <= arg <= len(data):
            return f"a memo index ({arg}) past the end of the file"
    return None


def _unpickle(file: Path) -> Any:
    with open_inside(file, "DCP's metadata") as f:  # a regular file: no link, no device
        data = f.readall()
    try:
        why = _scan(data)
        if why is None:
            return _MetadataUnpickler(data, file).load()
    except SnapshotError:
        raise
    except Exception as e:  # any malformed pickle: truncated, bad opcodes, wrong arguments...
        raise SnapshotError(
            f"{file}: cannot be read ({type(e).__name__}: {e}); {_UNTRUSTED}"
        ) from e
    raise SnapshotError(f"{file} holds {why}, which DCP metadata never holds; {_UNTRUSTED}")


def read_metadata(path: str | os.PathLike) -> Any:
    """DCP's `.metadata` of a snapshot, read by `_MetadataUnpickler` and checked to name
    tensors only, stored in the snapshot's own shard files."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(path) / ".metadata"
    metadata = _unpickle(file)
    if not isinstance(metadata, Metadata):
        raise SnapshotError(f"{file} is not torch.distributed.checkpoint metadata")
    if not _tensors_only(getattr(metadata, "state_dict_metadata", None)):
        raise SnapshotError(f"{file} describes items other than tensors; {_UNTRUSTED}")
    storage = getattr(metadata, "storage_data", None)
    if not _shards_inside(Path(path), storage):
        raise SnapshotError(f"{file} points outside the snapshot's shard files; {_UNTRUSTED}")
    missing = sorted(n for n in _shard_names(storage) if not _regular(Path(path) / n))
    if missing:
        raise SnapshotError(
            f"{file} lists shard file(s) {', '.join(missing)} that the snapshot lacks (written "
            "where this directory cannot see them?): it is incomplete — resume from another "
            "snapshot"
        )
    return metadata


def _tensors_only(items: Any) -> bool:
    """Every item a tensor, described whole (DCP would read a bytes item with torch.load)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    def whole(v: Any) -> bool:
        chunks = getattr(v, "chunks", None)
        return (
            isinstance(v, TensorStorageMetadata)
            and isinstance(getattr(v, "size", None), torch.Size)
            and getattr(getattr(v, "properties", None), "dtype", None) in DTYPE_NAMES
            and isinstance(chunks, list)
            and all(isinstance(c, ChunkStorageMetadata) for c in chunks)
        )

    return isinstance(items, dict) and all(whole(v) for v in items.values())


def _shards_inside(root: Path, storage: Any) -> bool:
    """Every stored item in a shard file of the snapshot itself: a regular file (no link)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    if not isinstance(storage, dict):
        return False
    return all(isinstance(v, _StorageInfo) for v in storage.values()) and all(
        isinstance(n, str)
        and _SHARD_FILE.fullmatch(n)
        and (_regular(root / n) or not os.path.lexists(root / n))  # missing: said by name
        for n in _shard_names(storage)
    )


def _shard_names(storage: dict) -> set:
    return {getattr(v, "relative_path", None) for v in storage.values()}


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class _Reader(dist_cp.FileSystemReader):
    """DCP's file reader, with `.metadata` read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
