"""Snapshot format: bitwise round trip, atomic publish, corruption detection, digests."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import torch
from conftest import assert_states_equal, make_state, rewrite_manifest, toy_data
from tensordict import TensorDict

import functrain as ft
from functrain import checkpoint as ck
from functrain.checkpoint import Policy, SnapshotError, Snapshots
from functrain.checkpoint import raw as raw_layout
from functrain.checkpoint.manifest import seal


def sample() -> TensorDict:
    """Many dtypes, 0-d and empty tensors, non-contiguous views, empty sub-dicts."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    w[0, 0], w[0, 1], w[0, 2] = float("nan"), -0.0, float("inf")
    params = {
        "0": {"weight": torch.nn.Parameter(w), "bias": torch.randn(7, generator=g)},
        "norm": {"weight": torch.randn(7, generator=g).to(torch.bfloat16)},
        "proj": {"t": torch.randn(3, 4, generator=g).t()},  # not contiguous
    }
    return TensorDict(
        {
            "step": torch.tensor(42),
            "params": params,
            "buffers": {},
            "opt": {"count": torch.tensor(3, dtype=torch.int32), "mu": {"0": {}}},
            "rng": torch.tensor(2**62 + 5, dtype=torch.int64),
            "stats": {
                "half": torch.randn(3, generator=g).half(),
                "f64": torch.randn(2, 2, generator=g).double(),
                "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
                "i16": torch.tensor([-3], dtype=torch.int16),
                "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
                "flag": torch.tensor(True),
                "mask": torch.tensor([True, False, True]),
                "c64": torch.randn(2, generator=g, dtype=torch.complex64),
                "none": torch.zeros(0, 3),
                "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            },
        },
        batch_size=[],
    )


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(a: TensorDict, b: TensorDict) -> None:
    assert sorted(map(str, a.keys(True))) == sorted(map(str, b.keys(True)))  # with empty dicts
    for key, x in a.items(True, True):
        y = b.get(key)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert torch.equal(raw(x), raw(y)), key


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    return ck.save(tmp_path / "state_42", sample(), {"step": 42, "device": "cpu", "world_size": 1})


def test_round_trip_is_bitwise(snap: Path) -> None:
    loaded, manifest = ck.load(snap)
    assert_bitwise(sample(), loaded)
    assert loaded["buffers"].is_empty() and loaded["opt", "mu", "0"].is_empty()
    assert loaded["step"].shape == () and loaded["step"].item() == 42
    assert manifest["step"] == 42


def test_manifest_records_layout_versions_and_meta(snap: Path) -> None:
    m = ck.read_manifest(snap)
    assert m["format_version"] == ck.FORMAT_VERSION == 1
    assert (m["step"], m["device"], m["world_size"]) == (42, "cpu", 1)
    assert datetime.fromisoformat(m["created"]).tzinfo == timezone.utc
    assert set(m["versions"]) == {"functrain", "torch", "tensordict", "python"}
    assert m["versions"]["torch"] == torch.__version__
    assert sorted(m["entries"]) == ["buffers", "opt", "params", "rng", "stats", "step"]
    params = m["entries"]["params"]
    keys = [leaf["key"] for leaf in params["leaves"]]
    assert keys == sorted(keys) == ["0/bias", "0/weight", "norm/weight", "proj/t"]
    assert all(leaf["offset"] % 64 == 0 for leaf in params["leaves"])
    assert params["leaves"][2] == {
        "key": "norm/weight",
        "dtype": "bfloat16",
        "shape": [7],
        "offset": 256,
        "nbytes": 14,
    }  # bias: 28 bytes at 0, weight: 140 at 64, ends at 204 -> next 64-byte boundary 256
    assert m["entries"]["opt"]["empty"] == ["mu/0"]
    assert m["entries"]["step"]["leaves"][0]["key"] == ""
    for name, f in m["files"].items():
        data = (snap / name).read_bytes()
        assert (len(data), zlib.crc32(data)) == (f["bytes"], f["crc32"])
    bias = params["leaves"][0]
    data = (snap / "params.bin").read_bytes()[bias["offset"] : bias["offset"] + bias["nbytes"]]
    assert data == raw(sample()["params", "0", "bias"]).numpy().tobytes()  # raw bytes, no pickle


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({}, r"meta\['step'\] must be a non-negative int, got None"),
        ({"step": True}, r"meta\['step'\] must be a non-negative int, got True"),
        ({"step": 1, "files": {}}, r"meta keys \['files'\] are written by save itself"),
        ({"step": 1, "recipe": object()}, "meta is not JSON-serializable"),
    ],
)
def test_bad_meta_is_refused_before_writing(tmp_path: Path, meta: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ck.save(tmp_path / "state_1", sample(), meta)
    assert list(tmp_path.iterdir()) == []


def test_non_tensor_leaf_is_refused(tmp_path: Path) -> None:
    td = TensorDict({"data": {"name": "corpus"}}, batch_size=[])
    with pytest.raises(TypeError, match="entry 'data' key 'name' holds a NonTensorData"):
        ck.save(tmp_path / "state_1", td, {"step": 1})


def test_refuses_to_overwrite(snap: Path) -> None:
    before = (snap / "manifest.json").read_bytes()
    with pytest.raises(SnapshotError, match=f"snapshot {snap} already exists"):
        ck.save(snap, TensorDict({}, batch_size=[]), {"step": 42})
    assert (snap / "manifest.json").read_bytes() == before


def test_failed_rename_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", fail)
    target = tmp_path / "state_5"
    with pytest.raises(SnapshotError, match=f"could not write snapshot {target}: .*Input/output"):
        ck.save(target, sample(), {"step": 5})
    assert list(tmp_path.iterdir()) == []  # temp dir removed, nothing visible
    assert ck.list_snapshots(tmp_path) == []


def test_disk_full_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(fd)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(
        SnapshotError, match=r"state_5: .*No space left on device \(the disk is full\)"
    ):
        ck.save(tmp_path / "state_5", sample(), {"step": 5})
    assert list(tmp_path.iterdir()) == []


def test_hard_crash_leaves_only_a_temp_dir_that_clean_partial_removes(tmp_path: Path) -> None:
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import sample
        from functrain import checkpoint as ck
        os.fsync = lambda fd: os._exit(3)  # die like a killed process, mid-save
        ck.save({str(tmp_path / "state_7")!r}, sample(), {{"step": 7}})
    """)
    assert subprocess.run([sys.executable, "-c", child]).returncode == 3
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".tmp-state_7-")
    assert ck.list_snapshots(tmp_path) == []
    with pytest.raises(SnapshotError, match="state_7 does not exist"):
        ck.load(tmp_path / "state_7")
    live = tmp_path / f".tmp-state_9-{os.getppid()}-0123abcd"  # a save by a live process
    live.mkdir()
    assert ck.clean_partial(tmp_path) == [leftover]
    assert sorted(tmp_path.iterdir()) == [live]
    assert ck.clean_partial(tmp_path) == []


def test_clean_partial_spares_a_save_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    real = raw_layout._write_snapshot

    def write_and_clean(tmp, plan, meta):
        seen.append(ck.clean_partial(tmp_path))
        real(tmp, plan, meta)

    monkeypatch.setattr(raw_layout, "_write_snapshot", write_and_clean)
    path = ck.save(tmp_path / "state_3", sample(), {"step": 3})
    assert seen == [[]] and ck.verify(path) == []


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(snap: Path, edit) -> None:
    m = orjson.loads((snap / "manifest.json").read_bytes())
    edit(m)
    rewrite_manifest(snap, m)


def _set_dtype(m: dict) -> None:
    m["entries"]["params"]["leaves"][0]["dtype"] = "float128"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: _flip_byte(s / "params.bin", 70), r"params\.bin: checksum mismatch"),
        (lambda s: os.truncate(s / "stats.bin", 10), r"stats\.bin: has 10 bytes but manifest"),
        (
            lambda s: (s / "opt.bin").unlink(),
            r"opt\.bin: data file listed in manifest.json is miss",
        ),
        (lambda s: (s / "manifest.json").write_text("{oops"), r"manifest\.json: not valid JSON"),
        (lambda s: (s / "manifest.json").unlink(), r"manifest\.json is missing"),
        (
            lambda s: _edit_manifest(s, lambda m: m.update(format_version=2)),
            r"manifest\.json: format_version 2 is not supported .* functrain that wrote it",
        ),
        (
            lambda s: _edit_manifest(s, lambda m: m.pop("files")),
            r"manifest\.json: missing field\(s\) files",
        ),
        (
            lambda s: _edit_manifest(s, _set_dtype),
            r"manifest\.json: entries\['params'\]: leaf 0: unknown dtype 'float128'",
        ),
        (
            lambda s: _edit_manifest(
                s, lambda m: m["files"].update({"../x.bin": {"bytes": 0, "crc32": 0}})
            ),
            r"manifest\.json: files\['\.\./x\.bin'\] is malformed",
        ),
    ],
)
def test_damage_is_reported_naming_the_file(snap: Path, damage, message: str) -> None:
    damage(snap)
    with pytest.raises(SnapshotError, match=message) as info:
        ck.load(snap)
    assert str(snap) in str(info.value)
    if "format_version" not in message:
        assert "resume from an earlier snapshot" in str(info.value)
    problems = ck.verify(snap)
    assert len(problems) == 1 and problems[0] == str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=f"snapshot directory {tmp_path / 'nope'} does not"):
        ck.read_manifest(tmp_path / "nope")


def test_verify_lists_every_problem(snap: Path) -> None:
    assert ck.verify(snap) == []
    _flip_byte(snap / "params.bin", 0)
    os.truncate(snap / "stats.bin", 3)
    problems = ck.verify(snap)
    assert len(problems) == 2
    assert "params.bin: checksum mismatch" in problems[0]
    assert "stats.bin: has 3 bytes" in problems[1]


def test_digests_change_only_for_the_changed_entry(tmp_path: Path) -> None:
    a = ck.save(tmp_path / "state_1", sample(), {"step": 1})
    b = ck.save(tmp_path / "state_2", sample(), {"step": 2})
    changed = sample()
    raw(changed["opt", "count"])[0] ^= 1  # one bit of one byte
    c = ck.save(tmp_path / "state_3", changed, {"step": 3})
    da, db, dc = ck.digests(a), ck.digests(b), ck.digests(c)
    assert da == db and len(da) == 6 and all(len(h) == 64 for h in da.values())
    assert [k for k in da if da[k] != dc[k]] == ["opt"]


def test_in_place_update_of_loaded_tensor_leaves_snapshot_intact(snap: Path) -> None:
    before = {p.name: p.read_bytes() for p in snap.iterdir()}
    loaded, _ = ck.load(snap)
    loaded["params", "0", "bias"].add_(1.0)
    loaded["stats", "u8"].zero_()
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == before
    assert ck.verify(snap) == []
    assert_bitwise(sample(), ck.load(snap)[0])


def test_list_snapshots_sees_only_published_ones(tmp_path: Path) -> None:
    for step in (10, 2):
        ck.save(tmp_path / f"state_{step}", sample(), {"step": step})
    (tmp_path / "state_3").mkdir()  # no manifest
    (tmp_path / "state_x").mkdir()
    (tmp_path / ".tmp-state_4-1-0123abcd").mkdir()
    assert ck.list_snapshots(tmp_path) == [(2, tmp_path / "state_2"), (10, tmp_path / "state_10")]
    assert ck.list_snapshots(tmp_path / "missing") == []


def test_files_larger_than_one_read_chunk(snap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_layout, "_CHUNK", 96)  # many chunks per file, a short last one
    assert ck.verify(snap) == []
    assert_bitwise(sample(), ck.load(snap)[0])
    _flip_byte(snap / "params.bin", 300)
    (problem,) = ck.verify(snap)
    assert "params.bin: checksum mismatch" in problem
    with pytest.raises(SnapshotError, match=r"params\.bin: checksum mismatch"):
        ck.load(snap)


def test_remove_deletes_only_snapshots(snap: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    with pytest.raises(SnapshotError, match=f"{other} is not a snapshot .*refusing to delete"):
        ck.remove(other)
    ck.remove(snap)
    assert sorted(tmp_path.iterdir()) == [other] and ck.list_snapshots(tmp_path) == []
    assert ck.versions()["torch"] == torch.__version__


def test_latest_reads_each_snapshot_once_and_skips_invalid_ones(tmp_path):
    for step in (1, 2, 3):
        ck.save(tmp_path / f"state_{step}", sample(), {"step": step})
    bad = tmp_path / "state_3" / "params.bin"
    data = bad.read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, wrong crc32
    reads, warnings = [], []

    def read(snap: Path):
        reads.append(snap.name)
        return ck.load(snap)

    snap, (tensors, manifest) = Snapshots(tmp_path).find("latest", read, warnings.append)
    assert snap.name == "state_2" and manifest["step"] == 2
    assert reads == ["state_3", "state_2"]  # the valid one read once: no verify-then-load
    assert len(warnings) == 1 and "state_3" in warnings[0] and "params.bin" in warnings[0]
    assert torch.equal(tensors["params", "0", "bias"], sample()["params", "0", "bias"])


def test_the_manager_saves_on_its_steps_retains_and_restores(tmp_path):
    x, y = toy_data(64)
    state = make_state()
    snapshots = Snapshots(tmp_path, Policy(every=2, keep_last=2), meta={"note": "m"})
    saved = []
    for i in range(7):
        state = ft.step(state, (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]))
        saved.append(snapshots.maybe_save(state, last=i == 6))
    assert saved == [False, True, False, True, False, True, True]
    assert snapshots.all_steps() == [6, 7] and snapshots.latest() == tmp_path / "state_7"
    assert ck.read_manifest(tmp_path / "state_7")["note"] == "m"
    restored, path = snapshots.restore("latest", like=make_state())
    assert path == tmp_path / "state_7"
    assert_states_equal(restored.tensors(), state.tensors())
    with pytest.raises(ck.SnapshotError, match="state_7 already exists"):
        snapshots.maybe_save(state, last=True)  # on_error stop: a failed write ends the run


def test_an_edited_manifest_is_caught_by_its_digest(tmp_path):
    snap = ck.save(tmp_path / "state_3", make_state().tensors(), {"step": 3})
    body = (snap / "manifest.json").read_bytes()
    (snap / "manifest.json").write_bytes(body.replace(b'"step": 3', b'"step": 9'))
    with pytest.raises(SnapshotError, match="does not match its digest manifest.sha256"):
        ck.load(snap)
    (snap / "manifest.json").write_bytes(body)
    (snap / "manifest.sha256").unlink()  # a sealed manifest without its digest
    with pytest.raises(
        SnapshotError, match="manifest.sha256: the digest of manifest.json is missing"
    ):
        ck.load(snap)
    (snap / "manifest.sha256").write_bytes(seal(body))
    unsealed = body.replace(b'"step": 3', b'"step": 9').replace(b'  "sealed": true,\n', b"")
    assert b"sealed" not in unsealed
    (snap / "manifest.json").write_bytes(unsealed)  # removing `sealed` switches nothing off
    with pytest.raises(SnapshotError, match="does not match its digest manifest.sha256"):
        ck.load(snap)
    (snap / "manifest.sha256").unlink()  # nor does removing the digest too, where the
    (snap / "manifest.json").write_bytes(  # manifest has a field of the sealing writers
        unsealed.replace(b'"step": 9', b'"step": 9, "finite": true')
    )
    with pytest.raises(SnapshotError, match="the digest of manifest.json is missing"):
        ck.load(snap)


def test_a_snapshot_published_by_another_writer_meanwhile_is_named_and_kept(tmp_path, monkeypatch):
    """Two writers of one run directory (a loop of your own beside a run): the one that
    publishes second is refused, naming a second writer; the other's snapshot is untouched
    and no temp dir is left."""
    from functrain.checkpoint import _files

    other = ck.save(tmp_path / "other" / "state_3", make_state().tensors(), {"step": 3})
    write = _files.write_manifest

    def and_meanwhile(tmp, *args, **kw):  # the other writer publishes state_3 first
        write(tmp, *args, **kw)
        shutil.copytree(other, tmp_path / "run" / "state_3")

    monkeypatch.setattr(_files, "write_manifest", and_meanwhile)
    (tmp_path / "run").mkdir()
    with pytest.raises(SnapshotError, match="another process writes snapshots into this run"):
        ck.save(tmp_path / "run" / "state_3", make_state(seed=1).tensors(), {"step": 3})
    assert ck.digests(tmp_path / "run" / "state_3") == ck.digests(other)  # theirs, kept
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["state_3"]


def test_a_data_file_that_is_a_link_out_of_the_snapshot_is_refused(tmp_path):
    snap = ck.save(tmp_path / "state_3", make_state().tensors(), {"step": 3})
    outside = tmp_path / "params.bin"
    (snap / "params.bin").rename(outside)
    (snap / "params.bin").symlink_to(outside)  # the same bytes: checksums would pass
    with pytest.raises(SnapshotError, match="params.bin: data file .* is a symbolic link"):
        ck.load(snap)
    assert ck.verify(snap) and "symbolic link" in ck.verify(snap)[0]
