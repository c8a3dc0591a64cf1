"""Async snapshots: staged before the next in-place step, one write in flight, errors surface."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import torch
from conftest import make_state, toy_data
from tensordict import TensorDict

import functrain as ft
from functrain import checkpoint
from functrain.checkpoint import AsyncWriter, _files, raw
from functrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
REAL_SAVE = checkpoint.save


def batches(n: int, size: int = 16) -> list:
    x, y = toy_data()
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]


def wait_idle(writer: AsyncWriter, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while writer.busy:
        if time.monotonic() > deadline:
            raise TimeoutError("the writer is still busy")
        time.sleep(0.01)


class Gate:
    """Stands in for checkpoint.save: holds every write until `release()`, counts overlap."""

    def __init__(self) -> None:
        self.opened, self.started = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.calls: list[TensorDict] = []

    def save(self, path, tensors, meta):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(tensors)
        self.started.set()
        try:
            if not self.opened.wait(10):
                raise TimeoutError("the test never released the write")
            return REAL_SAVE(path, tensors, meta)
        finally:
            with self.lock:
                self.active -= 1

    def release(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch) -> Gate:
    g = Gate()
    monkeypatch.setattr(raw, "save", g.save)
    return g


def disk_full(path, chunks):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- no race with the donated step


def _async_snapshot_then_train_on(tmp_path: Path, gate: Gate, k: int = 4, more: int = 8):
    """Snapshot at step k asynchronously, train `more` donated steps while the write is held."""
    data = batches(k + more)
    state = make_state()
    for b in data[:k]:
        state = ft.step(state, b)
    weight = state.params["0", "weight"]
    before = weight.clone()
    with AsyncWriter() as writer:
        writer.save(tmp_path / "async" / f"state_{k}", state.tensors(), {"step": k})
        assert gate.started.wait(10) and writer.busy  # the write has begun but reads nothing yet
        for b in data[k:]:
            state = ft.step(state, b)
        assert int(state.step) == k + more
        # the step really did update the very tensors that were snapshotted, in place
        assert state.params["0", "weight"] is weight and not torch.equal(weight, before)
        gate.release()
    return checkpoint.digests(tmp_path / "async" / f"state_{k}")


def _sync_digests(tmp_path: Path, k: int = 4) -> dict:
    state = make_state()
    for b in batches(k):
        state = ft.step(state, b)
    REAL_SAVE(tmp_path / "sync" / f"state_{k}", state.tensors(), {"step": k})
    return checkpoint.digests(tmp_path / "sync" / f"state_{k}")


def test_async_snapshot_is_bitwise_the_sync_one_though_training_went_on(tmp_path, gate):
    got = _async_snapshot_then_train_on(tmp_path, gate)
    want = _sync_digests(tmp_path)
    assert got == want
    assert set(got) >= {"params", "opt", "step", "data", "rng", "stats"}


def test_the_race_check_fails_when_nothing_is_staged(tmp_path, gate, monkeypatch):
    # Negative control: a writer that hands the live tensors to its thread writes step-12 bytes.
    monkeypatch.setattr(AsyncWriter, "_stage", lambda self, tensors: (tensors, []))
    got = _async_snapshot_then_train_on(tmp_path, gate)
    want = _sync_digests(tmp_path)
    assert got["params"] != want["params"] and got["opt"] != want["opt"]


def test_staging_buffer_is_a_copy_reused_until_the_structure_changes(tmp_path, gate):
    gate.release()
    td = TensorDict({"w": torch.arange(6.0), "sub": {"b": torch.ones(2)}, "e": {}}, [])
    with AsyncWriter() as writer:
        writer.save(tmp_path / "state_1", td, {"step": 1})
        td["w"].add_(100)  # the caller's tensors are free again once save returns
        writer.save(tmp_path / "state_2", td, {"step": 2})
        writer.save(tmp_path / "state_3", td.apply(lambda t: t[:1]), {"step": 3})
    first, second, third = (dict(c.items(True, True)) for c in gate.calls)
    assert first["w"].data_ptr() == second["w"].data_ptr() != td["w"].data_ptr()
    assert third["w"].data_ptr() != first["w"].data_ptr() and third["w"].shape == (1,)
    loaded = [checkpoint.load(tmp_path / f"state_{i}")[0] for i in (1, 2, 3)]
    assert torch.equal(loaded[0]["w"], torch.arange(6.0))
    assert torch.equal(loaded[1]["w"], torch.arange(6.0) + 100)
    assert torch.equal(loaded[2]["w"], torch.tensor([100.0]))
    assert list(loaded[0]["e"].keys()) == []  # empty sub-dicts survive staging


def test_at_most_one_write_in_flight(tmp_path, gate):
    td = TensorDict({"w": torch.zeros(4)}, [])
    writer = AsyncWriter()
    writer.save(tmp_path / "state_1", td, {"step": 1})
    second = threading.Thread(target=writer.save, args=(tmp_path / "state_2", td, {"step": 2}))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first write before staging over its buffer
    assert len(gate.calls) == 1
    gate.release()
    second.join(10)
    writer.close()
    assert gate.max_active == 1 and len(gate.calls) == 2
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path)] == [1, 2]


# ---------------------------------------------------------------- errors and completion


def test_write_error_raised_once_at_the_next_call_nothing_published(tmp_path, monkeypatch):
    monkeypatch.setattr(_files, "write_file", disk_full)
    writer = AsyncWriter()
    writer.save(tmp_path / "state_1", TensorDict({"w": torch.ones(3)}, []), {"step": 1})
    wait_idle(writer)
    with pytest.raises(
        checkpoint.SnapshotError,
        match=r"could not write snapshot .*state_1: \[Errno 28\] No space left on device "
        r"\(the disk is full\).*Nothing was published",
    ):
        writer.check()
    writer.check()  # raised once
    assert list(tmp_path.iterdir()) == []  # no snapshot, no temp dir
    writer.close()


def test_pending_error_raised_by_save_close_and_with_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(_files, "write_file", disk_full)
    td = TensorDict({"w": torch.ones(3)}, [])
    writer = AsyncWriter()
    writer.save(tmp_path / "state_1", td, {"step": 1})
    with pytest.raises(checkpoint.SnapshotError, match="state_1"):
        writer.save(tmp_path / "state_2", td, {"step": 2})  # waits, then raises; starts nothing
    assert not writer.busy
    writer.save(tmp_path / "state_3", td, {"step": 3})
    with pytest.raises(checkpoint.SnapshotError, match="state_3"):
        writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.save(tmp_path / "state_4", td, {"step": 4})
    with pytest.raises(checkpoint.SnapshotError, match="state_5"), AsyncWriter() as w:
        w.save(tmp_path / "state_5", td, {"step": 5})
    # an error already on its way out is not hidden by the writer's own
    with pytest.raises(KeyError, match="training broke"), AsyncWriter() as w:
        w.save(tmp_path / "state_6", td, {"step": 6})
        raise KeyError("training broke")


def test_on_done_runs_after_publish_and_its_error_surfaces(tmp_path):
    seen = []

    def on_done(path: Path) -> None:
        seen.append((path, checkpoint.verify(path), threading.current_thread().name))
        if path.name == "state_2":
            raise checkpoint.SnapshotError("retention failed")

    td = TensorDict({"w": torch.ones(3)}, [])
    with AsyncWriter() as writer:
        writer.save(tmp_path / "state_1", td, {"step": 1}, on_done=on_done)
        writer.save(tmp_path / "state_2", td, {"step": 2}, on_done=on_done)
        with pytest.raises(checkpoint.SnapshotError, match="retention failed"):
            writer.wait_until_finished()
    assert seen == [
        (tmp_path / "state_1", [], "functrain-async-save"),
        (tmp_path / "state_2", [], "functrain-async-save"),
    ]


def test_interpreter_exit_waits_for_the_write_in_flight(tmp_path):
    script = (
        "import sys, time, torch\n"
        "from tensordict import TensorDict\n"
        "from functrain.checkpoint import AsyncWriter, raw\n"
        "real = raw.save\n"
        "raw.save = lambda *a: (time.sleep(1.0), real(*a))[1]\n"
        "td = TensorDict({'w': torch.ones(3)}, [])\n"
        "AsyncWriter().save(sys.argv[1] + '/state_1', td, {'step': 1})\n"
        "AsyncWriter().save(sys.argv[1] + '/file/state_2', td, {'step': 2})  # fails\n"
    )
    (tmp_path / "file").write_text("a file where a run directory should be")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert checkpoint.verify(tmp_path / "state_1") == []
    assert checkpoint.read_manifest(tmp_path / "state_1")["step"] == 1
    failed = f"functrain: an async snapshot failed: could not write snapshot {tmp_path}/file/"
    assert failed in out.stderr  # a write that fails at exit is reported, not lost


# ---------------------------------------------------------------- the CLI


def run_cli(tmp_path: Path, name: str, *overrides: str) -> int:
    base = [f"out_dir={tmp_path}", f"name={name}", "steps=10", "checkpoint.every=5"]
    return main(["run", str(TINY), *base, "eval.every=null", *overrides])


def test_cli_async_run_matches_sync_run_and_retains_after_publish(tmp_path, capsys):
    assert run_cli(tmp_path, "sync") == 0
    assert run_cli(tmp_path, "async", "checkpoint.keep_last=1", "checkpoint.async=true") == 0
    a, s = (checkpoint.digests(tmp_path / n / "state_10") for n in ("async", "sync"))
    assert a == s
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == [
        ".lock",  # the run's owner (`functrain.run.rundir.lock_run`)
        "metrics.jsonl",
        "recipe.yaml",
        "state_10",
    ]  # retention removed state_5 after state_10 was published; no temp dir left behind
    assert "async: true" in (tmp_path / "async" / "recipe.yaml").read_text()
    assert "async: false" in (tmp_path / "sync" / "recipe.yaml").read_text()


def fail_snapshot(monkeypatch, step: int) -> None:
    """Every write of snapshot state_<step> fails with a full disk."""
    real = _files.write_file

    def write_file(path, chunks):
        if f"state_{step}-" in path.parent.name:
            disk_full(path, chunks)
        return real(path, chunks)

    monkeypatch.setattr(_files, "write_file", write_file)


def logged_steps(run: Path) -> list[int]:
    return [orjson.loads(r)["step"] for r in (run / "metrics.jsonl").read_bytes().splitlines()]


@pytest.mark.parametrize(
    ("failing", "kept", "why"),
    [(5, [], "checkpoint.on_error is 'stop'"), (10, [5], "it was the run's last snapshot")],
)
def test_cli_async_write_error_stops_the_run(tmp_path, capsys, monkeypatch, failing, kept, why):
    fail_snapshot(monkeypatch, failing)
    assert run_cli(tmp_path, "r", "checkpoint.async=true") == 2
    err = capsys.readouterr().err
    assert f"error: could not write snapshot {tmp_path / 'r' / f'state_{failing}'}" in err
    assert "No space left on device (the disk is full)" in err and "Nothing was published" in err
    assert f"Training stopped because {why}" in err
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path / "r")] == kept
    # a failed snapshot stops the run at the next step: nothing past it is logged
    assert logged_steps(tmp_path / "r") == list(range(5, failing + 1, 5))
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "r").iterdir())


def test_cli_async_write_error_with_on_error_continue_warns_and_trains_on(
    tmp_path, capsys, monkeypatch
):
    fail_snapshot(monkeypatch, 5)
    assert run_cli(tmp_path, "r", "checkpoint.async=true", "checkpoint.on_error=continue") == 0
    err = capsys.readouterr().err
    assert f"warning: could not write snapshot {tmp_path / 'r' / 'state_5'}" in err
    assert "training goes on (checkpoint.on_error: continue)" in err
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path / "r")] == [10]
    assert logged_steps(tmp_path / "r") == [5, 10]
