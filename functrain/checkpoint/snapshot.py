"""One snapshot, whatever its layout (raw or dcp): save, load, verify, check, digests."""

from __future__ import annotations

import os

import torch
from tensordict import TensorDict

from functrain.checkpoint import dcp, raw
from functrain.checkpoint.manifest import read_manifest
from functrain.errors import SnapshotError

__all__ = ["check", "digests", "load", "save", "verify"]

#: Write a TensorDict (batch_size []) and JSON meta (with an int `step`) as a new snapshot.
save = raw.save


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TensorDict, dict]:
    """Read a snapshot back as (tensors, manifest), checking every file's size and crc32.

    Leaves are fresh memory, never mapped to the files. A sharded snapshot (`layout: dcp`)
    is read whole, in this process alone.
    """
    manifest = read_manifest(path)
    device = torch.device(device)
    if manifest.get("layout") == "dcp":
        check(path)
        return dcp.load_whole(path, manifest).to(device), manifest
    return raw.read(path, manifest, device), manifest


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem found in a snapshot (manifest, sizes, checksums); [] when it is valid."""
    try:
        manifest = read_manifest(path)
    except SnapshotError as e:
        return [str(e)]
    problems = raw.file_problems(path, manifest)
    gone = any(".metadata:" in p for p in problems)  # said once, by the file check
    if manifest.get("layout") == "dcp" and not gone:  # every shard `.metadata` lists, too
        try:
            dcp.read_metadata(path)
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
    if manifest.get("layout") != "dcp":
        return raw.digests(path, manifest)
    whole = load(path)[0]
    return {
        entry: raw.digest(spec, lambda leaf, e=entry: raw.leaf_bytes(whole, e, leaf["key"]))
        for entry, spec in manifest["entries"].items()
    }
