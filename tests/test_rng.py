"""Seeds derive from a real hash: stable across processes, different per input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from functrain import rng


def test_fold_in_is_stable_across_processes():
    code = "from functrain import rng; print(rng.fold_in(3, 'x', 5))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == rng.fold_in(3, "x", 5)


def test_fold_in_separates_inputs():
    seeds = {rng.fold_in(k, s, r) for k in range(4) for s in range(50) for r in range(3)}
    assert len(seeds) == 600
    assert rng.fold_in(1, 2) != rng.fold_in(12)
    assert rng.fold_in("1") != rng.fold_in(1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_fold_in_is_a_stable_63_bit_hash():
    a = rng.fold_in(3, "data", 7)
    assert a == rng.fold_in(3, "data", 7)
    assert 0 <= a < 2**63
    assert (
        len(
            {
                a,
                rng.fold_in(3, "data", 8),
                rng.fold_in(4, "data", 7),
                rng.fold_in("3", "data", 7),
            }
        )
        == 4
    )


def test_key_rejects_bad_seeds():
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        rng.key(-1)
    with pytest.raises(ValueError, match="got True"):
        rng.key(True)


def test_seeded_draws_as_torch_manual_seed_would_and_restores_the_global_rng():
    before = torch.random.get_rng_state()
    with rng.seeded(1234):
        inside = torch.rand(8)
        mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(torch.random.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        assert torch.equal(torch.rand(8), inside)
        assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), mask)
