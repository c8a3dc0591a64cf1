"""`functrain check`: the real CLI in a subprocess passes on the shipped recipes, and names
the step, entry and cause of a dataset and a model that do not resume exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
ON_PATH = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_tiny_resumes_bitwise(tmp_path):
    out = cli("check", TINY, "--steps", "6", "--keep", tmp_path / "kept", cwd=tmp_path)
    assert out.stdout.startswith("check: bitwise:"), out.stdout
    kept = tmp_path / "kept"
    assert sorted(p.name for p in (kept / "resumed").glob("state_*")) == [
        f"state_{s}" for s in range(1, 7)
    ]  # a snapshot at every step, in both runs
    assert (kept / "trace" / "second" / "rank0.jsonl").exists()
    assert not (tmp_path / "runs").exists()  # the recipe's own out_dir is never touched


def test_lm_recipe_with_workers_2_to_1(tmp_path):
    """The shipped recipe (2 workers, canonical) on 2 processes, resumed on 1."""
    out = cli("check", ROOT / "recipes" / "lm.yaml", "--steps", "4", "--nproc", "2", cwd=tmp_path)
    assert out.stdout.startswith("check: bitwise:"), out.stdout
    assert "(2 processes, resumed on 1)" in out.stdout


def test_gpt_tokens_recipe(tmp_path):
    cli("prepare", "--out", tmp_path / "tokens", "--max-bytes", "300000", cwd=tmp_path)
    out = cli(
        "check",
        ROOT / "recipes" / "gpt_tokens.yaml",
        f"data.dataset.path={tmp_path / 'tokens'}",
        "--steps",
        "4",
        cwd=tmp_path,
    )
    assert out.stdout.startswith("check: bitwise:"), out.stdout


def test_non_canonical_recipe_resumes_on_2_and_says_why(tmp_path):
    out = cli("check", TINY, "--steps", "4", "--nproc", "2", cwd=tmp_path)
    assert out.stdout.startswith("check: bitwise:"), out.stdout
    assert "(2 processes, resumed on 2)" in out.stdout
    assert "2 -> 1 processes is not bitwise for this recipe" in out.stderr


def _differs(tmp_path, *args) -> str:
    """The verdict of a check (with tests/ importable) that must find a difference."""
    out = cli("check", TINY, *args, cwd=tmp_path, env=ON_PATH, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    return out.stdout


def test_unseeded_dataset_randomness_is_found(tmp_path):
    line = _differs(
        tmp_path, "data.dataset._component_=_check_components.noisy_corpus", "--steps", "6"
    )
    assert line.startswith("check: DIFFERS:"), line
    # torch's global RNG is not the same in two processes, so two runs from scratch differ
    assert "first difference at step 1 (before the resume, so two runs from scratch" in line
    assert "the batch of step 1 has the same dataset indices but other samples" in line


def test_dataset_without_fingerprint_is_refused_on_resume_and_explained(tmp_path):
    line = _differs(
        tmp_path, "data.dataset._component_=_check_components.noisy_corpus",
        "data.dataset.fingerprinted=false", "--steps", "4",
    )  # fmt: skip
    assert "the resume at step 2 was refused" in line
    assert "data content changed" in line
    assert "randomness in the dataset not seeded from the sample index" in line


def test_model_state_outside_the_train_state_is_found(tmp_path):
    line = _differs(tmp_path, "model._component_=_check_components.CountingGPT", "--steps", "4")
    assert "first difference at step 3 (the first step after the resume)" in line
    assert "the batches are identical, so the model's computation differs" in line
    assert "state kept outside the TrainState" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "1"], "--steps 1: give 2 to the recipe's steps (40)"),
        (["--steps", "4", "--at", "4"], "--at 4: give a step between 1 and --steps - 1 (3)"),
        (["optim.nope=1"], "optim.nope"),
    ],
)
def test_bad_arguments_are_one_paragraph(tmp_path, args, message):
    out = cli("check", TINY, *args, cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_canonical_fsdp_recipe_resumes_on_1_process(tmp_path):
    """FSDP with canonical micro-batches reduces in the canonical tree: 2 -> 1 is bitwise."""
    out = cli(
        "check", TINY, "parallel=fsdp", "step.0.micro_batches=1", "step.0.micro_batch_size=2",
        "--steps", "4", "--nproc", "2", cwd=tmp_path,
    )  # fmt: skip
    assert out.stdout.startswith("check: bitwise:"), out.stdout + out.stderr
    assert "(2 processes, resumed on 1)" in out.stdout


def test_check_switches_the_recipes_sinks_off(tmp_path, monkeypatch):
    """W&B on, not logged in: the scratch runs must not start W&B runs (nor fail on it)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path / "home")}
    out = cli("check", TINY, "log.wandb=true", "log.tensorboard=true", "--steps", "2",
              cwd=tmp_path, env=env)  # fmt: skip
    assert out.stdout.startswith("check: bitwise:"), out.stdout
