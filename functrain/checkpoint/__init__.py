"""Snapshots: the state written to a directory, read back, checked, and managed for a run.

    save / load / verify / check / digests    one snapshot, whatever its layout
    Snapshots                                 a run's snapshots: when to save, retention,
                                              async writes, errors, agreement between ranks
    describe / plan_resume / Plan             what a run is (its manifest entries), and the
                                              one resume plan: does a snapshot fit it
    AsyncWriter                               stage a copy, write it in the background
    init_from / read_weights                  weights a run starts from: safetensors, a
                                              save_pretrained directory, a snapshot

The modules below: `raw` (functrain's own layout: one file per entry), `dcp` (sharded
states through torch.distributed.checkpoint), `manifest` (what a manifest holds and the
checks it must pass), `plan` (the resume plan), `_files` (names, temp dirs, fsync, the atomic rename: the one place
that spells `state_<step>`), `async_writer`, `manager`, and `faults` (test-only fault
injection). This package imports the core, never the run machinery or `functrain.distributed`.

>>> save("runs/a/state_10", td, {"step": 10})          # doctest: +SKIP
>>> tensors, manifest = load("runs/a/state_10")       # doctest: +SKIP
"""

from __future__ import annotations

from functrain.checkpoint import dcp, raw
from functrain.checkpoint._files import (
    clean_partial,
    free_bytes,
    list_snapshots,
    process_alive,
    remove,
    snapshot_path,
    snapshot_step,
    write_problem,
)
from functrain.checkpoint.async_writer import AsyncWriter
from functrain.checkpoint.manager import NonFiniteError, Policy, Snapshots
from functrain.checkpoint.manifest import FORMAT_VERSION, MANIFEST, read_manifest, versions
from functrain.checkpoint.plan import FREE_KEYS, Plan, describe, frozen_hash, plan_resume
from functrain.checkpoint.pretrained import content_hash, init_from, read_weights
from functrain.checkpoint.snapshot import check, digests, load, save, verify
from functrain.errors import SnapshotError

__all__ = [
    "NonFiniteError",
    "FORMAT_VERSION",
    "MANIFEST",
    "FREE_KEYS",
    "AsyncWriter",
    "Plan",
    "Policy",
    "SnapshotError",
    "Snapshots",
    "check",
    "content_hash",
    "describe",
    "clean_partial",
    "free_bytes",
    "dcp",
    "digests",
    "frozen_hash",
    "init_from",
    "list_snapshots",
    "plan_resume",
    "load",
    "process_alive",
    "raw",
    "read_manifest",
    "read_weights",
    "remove",
    "save",
    "snapshot_path",
    "snapshot_step",
    "write_problem",
    "verify",
    "versions",
]
