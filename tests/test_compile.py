"""`compile: true`: the model's forward through torch.compile (inductor on CPU here), one
graph for the whole run, and a compiled run resumed in a new process bitwise equal to the
unbroken compiled run."""

from __future__ import annotations

import torch
from conftest import assert_branch_resumes_bitwise, cli
from test_precision import SHORT, TINY, batches, gpt, state_of
from torch._dynamo.utils import counters

import functrain as ft
from functrain import checkpoint


def test_a_compiled_model_compiles_once_and_steps_without_recompiling():
    torch._dynamo.reset()
    counters.clear()
    model = gpt()
    model.compile()
    state = state_of("bf16", model)
    ft.step(state, batches(1)[0], donate=False)  # a trial step on a copy, as the CLI's probe
    graphs, frames = dict(counters["stats"]), dict(counters["frames"])
    for batch in batches(5):
        state = ft.step(state, batch)
    assert graphs["unique_graphs"] == 1  # the whole forward, one graph
    assert dict(counters["stats"]) == graphs  # no new graph, no recompilation
    assert dict(counters["frames"]) == frames  # (the frames: the forward, and the module's
    # hook refusing use outside bind, which dynamo traces to no graph)
    assert not counters["graph_break"] and not counters["recompiles"]
    assert torch.isfinite(state.metrics["loss"])


def test_a_compiled_run_resumed_in_a_new_process_is_bitwise(tmp_path):
    flags = ("compile=true", "precision=bf16")
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *SHORT, *flags)
    settings = checkpoint.read_manifest(a / "state_12")["determinism"]
    assert settings == {
        "mode": "strict",
        "tf32": False,
        "deterministic_algorithms": True,
        "inductor_deterministic": True,
    }
    eager = tmp_path / "eager"
    cli("run", TINY, f"out_dir={tmp_path}", "name=eager", *SHORT, "precision=bf16")
    assert checkpoint.digests(eager / "state_12") != checkpoint.digests(a / "state_12")
    eager_settings = checkpoint.read_manifest(eager / "state_12")["determinism"]
    assert eager_settings == {"mode": "strict", "tf32": False, "deterministic_algorithms": True}


def test_an_autotuning_compile_mode_is_refused(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "compile.mode=max-autotune", check=False)
    assert res.returncode == 2
    assert "compile.mode: got 'max-autotune'" in res.stderr, res.stderr
    assert "pick kernels by timing" in res.stderr
    assert not (tmp_path / "tiny").exists()
