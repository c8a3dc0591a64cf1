"""`functrain inspect`: a snapshot's manifest, validity and content digests, or a run's
snapshots and lineage (where it came from, where it was resumed, its branches), as text or
JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import torch

from functrain import checkpoint, determinism
from functrain.errors import RunError

__all__ = ["inspect", "lineage"]


def inspect(path: Path, as_json: bool) -> int:
    """Print the report of a snapshot or a run directory; 1 when a snapshot (any of the
    run's) is damaged."""
    # A `state_N` dir without its manifest is a damaged snapshot, not an empty run: say so.
    if (path / checkpoint.MANIFEST).exists() or checkpoint.snapshot_step(path) is not None:
        report = _snapshot_report(path)
        if as_json:
            sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            _print_snapshot(report)
        return 0 if report["valid"] else 1
    if path.is_dir():
        rows = [_snapshot_row(p) for _, p in checkpoint.list_snapshots(path, published=False)]
        report = {"run": str(path), "snapshots": rows, "lineage": lineage(path)}
        if as_json:
            sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            _print_run(path, rows)
            _print_lineage(report["lineage"])
        return 0 if all(r["valid"] for r in rows) else 1
    raise RunError(f"{path} is neither a snapshot (no {checkpoint.MANIFEST}) nor a run directory")


def _snapshot_report(path: Path) -> dict:
    manifest = checkpoint.read_manifest(path)
    problems = checkpoint.verify(path)
    sizes = {
        entry: sum(leaf["nbytes"] for leaf in spec["leaves"])
        for entry, spec in manifest["entries"].items()
    }
    return {
        "path": str(path),
        "step": manifest["step"],
        "valid": not problems,
        "problems": problems,
        "digests": checkpoint.digests(path) if not problems else {},
        # counted only where the manifest says a step went NaN: a second read of every byte
        "nonfinite": _nonfinite(path) if not problems and not manifest.get("finite", True) else {},
        "sizes": sizes,
        "bitwise": determinism.promised(manifest.get("determinism")),
        "manifest": manifest,
    }


def _print_snapshot(r: dict) -> None:
    m = r["manifest"]
    print(f"snapshot  {r['path']}")
    print(f"step      {r['step']}")
    print(f"created   {m['created']}")
    print(f"valid     {'yes' if r['valid'] else 'NO'}")
    for p in r["problems"]:
        print(f"  problem: {p}")
    for key in ("recipe_hash", "device", "world_size", "layout", "parent"):
        if m.get(key) is not None:
            print(f"{key:<9} {m[key]}")
    print("versions  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if m.get("init_from"):
        init = m["init_from"]
        print(f"init from {init['path']} ({init['format']}, sha256 {init['sha256']})")
    for change in m.get("allowed_changes", []):
        print(f"allowed   {change}")
    for event in m.get("lineage", []):
        print(f"{event['kind']:<9} {_event(event)}")
    if not m.get("finite", True):
        print("finite    NO: a step before it had a non-finite loss or gradients")
    if not r["bitwise"]:
        print(f"bitwise   NOT PROMISED: {_unpromised(m)}")
    print(f"{'entry':<10}{'bytes':>14}  sha256")
    for entry, size in r["sizes"].items():
        bad = r["nonfinite"].get(entry)
        flag = f"  NON-FINITE: {bad} value(s) NaN or inf" if bad else ""
        print(f"{entry:<10}{size:>14}  {r['digests'].get(entry, '-')}{flag}")


def _nonfinite(path: Path) -> dict[str, int]:
    """Entry -> how many of its floating-point values are NaN or inf (entries with none are
    left out, and `metrics` and `stats`, whose NaN and inf mean "not measured yet")."""
    tensors = checkpoint.load(path)[0]
    out = {}
    for entry in tensors.keys():  # noqa: SIM118 -- a TensorDict
        if entry in ("metrics", "stats"):
            continue
        value = tensors[entry]
        leaves = [value] if isinstance(value, torch.Tensor) else value.values(True, True)
        bad = sum(int((~t.isfinite()).sum()) for t in leaves if t.is_floating_point())
        if bad:
            out[entry] = bad
    return out


def _snapshot_row(path: Path) -> dict:
    problems = checkpoint.verify(path)
    try:
        m = checkpoint.read_manifest(path)
        created, size = m["created"], sum(f["bytes"] for f in m["files"].values())
        finite, bitwise = m.get("finite", True), determinism.promised(m.get("determinism"))
    except checkpoint.SnapshotError:
        created, size, finite, bitwise = None, None, True, True
    return {
        "name": path.name,
        "step": checkpoint.snapshot_step(path),
        "created": created,
        "bytes": size,
        "valid": not problems,
        "problem": problems[0] if problems else None,
        "finite": finite,
        "bitwise": bitwise,
    }


def _unpromised(manifest: dict) -> str:
    mode = manifest["determinism"]["mode"]
    return (
        f"trained with determinism: {mode} (nondeterministic kernels allowed), so a resume "
        "is not promised the bits of an unbroken run"
    )


def _print_run(path: Path, rows: list[dict]) -> None:
    print(f"run {path}: {len(rows)} snapshot(s)")
    print(f"{'step':>10}  {'created':<27}{'bytes':>14}  status")
    for r in rows:
        status = "valid" if r["valid"] else f"INVALID: {r['problem']}"
        status += "" if r["finite"] else ", NON-FINITE (a step before it went NaN or inf)"
        status += "" if r["bitwise"] else ", not promised bitwise (determinism)"
        print(f"{r['step']:>10}  {r['created'] or '?':<27}{r['bytes'] or 0:>14}  {status}")


def lineage(run: Path) -> dict:
    """Where `run` came from and went: `parent` (the snapshot it was branched from, or
    None), `events` (each resume and branch: step, snapshot, world sizes, accepted recipe
    changes), read from its newest readable manifest, and `branches` (the runs beside it
    branched from one of its snapshots)."""
    manifest = _newest_manifest(run)
    events = manifest.get("lineage", []) if manifest else []
    here = run.resolve()
    branches = []
    for other in sorted(here.parent.iterdir()) if here.parent.is_dir() else []:
        m = _newest_manifest(other) if other.is_dir() and other.resolve() != here else None
        origin = [e for e in m.get("lineage", []) if e["kind"] == "branch"] if m else []
        if origin and Path(origin[-1]["from"]).parent == here:  # its own branch point (the
            # earlier ones it inherited belong to its ancestors)
            event = origin[-1]
            branches.append({"run": str(other), "from": event["from"], "step": event["step"]})
    return {
        "parent": manifest.get("parent") if manifest else None,
        "events": events,
        "branches": branches,
    }


def _newest_manifest(run: Path) -> dict | None:
    for _, snap in reversed(checkpoint.list_snapshots(run)):
        try:
            return checkpoint.read_manifest(snap)
        except checkpoint.SnapshotError:
            continue
    return None


def _event(event: dict) -> str:
    before, after = event.get("world_size", [None, None])
    text = f"at step {event['step']} from {event['from']}"
    if before != after:
        text += f" ({before} -> {after} processes)"
    if event["changes"]:
        text += "; accepted: " + ", ".join(event["changes"])
    return text


def _print_lineage(found: dict) -> None:
    if found["parent"]:
        print(f"branched from {found['parent']}")
    for event in found["events"]:
        print(f"{event['kind']:<7} {_event(event)}")
    for branch in found["branches"]:
        print(f"branched off: {branch['run']} from {branch['from']}")
