"""The promise: stop at step k, resume, train to n — bitwise the same as never stopping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from _resume_common import fresh_state, restore, save, train
from conftest import assert_states_equal

from functrain import checkpoint

N, K = 30, 17  # K is mid-epoch (12 steps per epoch); N crosses into the third epoch


@pytest.fixture(scope="module")
def unbroken():
    return {w: train(fresh_state(N), N, w) for w in (0, 2)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_process_is_bitwise(tmp_path, unbroken, workers):
    straight, straight_losses = unbroken[workers]
    first, first_losses = train(fresh_state(N), K, workers)
    save(tmp_path / "state_k", first)
    resumed, second_losses = train(restore(tmp_path / "state_k", N), N, workers)
    assert int(resumed.step) == N
    assert_states_equal(resumed.tensors(), straight.tensors())
    assert first_losses + second_losses == straight_losses


def test_workers_do_not_change_the_result(unbroken):
    assert_states_equal(unbroken[0][0].tensors(), unbroken[2][0].tensors())
    assert unbroken[0][1] == unbroken[2][1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_is_bitwise(tmp_path, unbroken, workers):
    straight, straight_losses = unbroken[workers]
    first, first_losses = train(fresh_state(N), K, workers)
    save(tmp_path / "state_k", first)
    worker = Path(__file__).with_name("_resume_worker.py")
    subprocess.run(
        [
            sys.executable,
            str(worker),
            str(tmp_path / "state_k"),
            str(N),
            str(workers),
            str(tmp_path),
        ],
        check=True,
        cwd=worker.parent,
    )
    final, _ = checkpoint.load(tmp_path / "final")
    assert_states_equal(final, straight.tensors())
    assert first_losses + orjson.loads((tmp_path / "losses.json").read_bytes()) == straight_losses


def test_a_different_key_gives_a_different_run(unbroken):
    """Guards the test above against passing vacuously: the dropout masks do matter."""
    import functrain as ft

    other = fresh_state(N)
    other = other.replace(rng=other.rng + 1)
    state, losses = train(other, 3, 0)
    assert losses != unbroken[0][1][:3]
    assert isinstance(state, ft.TrainState)
