"""On a CUDA GPU: bf16 + compile resumed bitwise, the determinism settings recorded, and a
CUDA snapshot read on a machine without one. Skipped where torch sees no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import cli, timeless_metrics
from test_precision import ROOT, SHORT, TINY

from functrain import checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ("device=cuda", "precision=bf16", "compile=true")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda")
    cli("run", TINY, f"out_dir={out}", "name=A", *SHORT, *GPU)
    return out


def test_bf16_compiled_on_cuda_resumes_bitwise(gpu_run):
    cli("resume", TINY, f"out_dir={gpu_run}", "name=A", *SHORT, *GPU,
        "--from", "state_6", "--name", "B")  # fmt: skip
    a, b = gpu_run / "A", gpu_run / "B"
    assert checkpoint.digests(b / "state_12") == checkpoint.digests(a / "state_12")
    assert timeless_metrics(b) == timeless_metrics(a)


def test_the_determinism_settings_are_recorded(gpu_run):
    manifest = checkpoint.read_manifest(gpu_run / "A" / "state_12")
    settings = manifest["determinism"]
    assert settings["deterministic_algorithms"] is True
    assert settings["cublas_workspace_config"] == ":4096:8"
    assert settings["cudnn_deterministic"] is True and settings["cudnn_benchmark"] is False
    assert settings["inductor_deterministic"] is True


def test_a_cuda_snapshot_loads_where_there_is_no_gpu(gpu_run):
    code = (
        "import sys, torch; from functrain import checkpoint; "
        "assert not torch.cuda.is_available(); "
        "t, m = checkpoint.load(sys.argv[1]); "
        "assert all(x.device.type == 'cpu' for x in t.values(True, True)); print(m['step'])"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code, str(gpu_run / "A" / "state_12")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "12", out.stderr
    res = cli("resume", TINY, f"out_dir={gpu_run}", "name=A", *SHORT, "device=cpu",
              "precision=bf16", "compile=true", "--from", "state_6", "--name", "C", "--allow-change", "device",
              env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert "step 12/12" in res.stdout


def test_fp16_with_its_loss_scaler_on_cuda_resumes_bitwise(tmp_path):
    fp16 = ("device=cuda", "precision=fp16")
    cli("run", TINY, f"out_dir={tmp_path}", "name=A", *SHORT, *fp16)
    cli("resume", TINY, f"out_dir={tmp_path}", "name=A", *SHORT, *fp16,
        "--from", "state_6", "--name", "B")  # fmt: skip
    a, b = tmp_path / "A", tmp_path / "B"
    assert checkpoint.digests(b / "state_12") == checkpoint.digests(a / "state_12")
    assert timeless_metrics(b) == timeless_metrics(a)


@pytest.mark.parametrize("flags", [("precision=bf16",), ("precision=bf16", "compile=true")])
def test_plain_steps_never_make_the_host_wait_for_the_gpu(tmp_path, flags):
    """torch.cuda.set_sync_debug_mode("error") over every step that neither logs,
    evaluates nor snapshots (after two of warm-up): one host sync there fails the run."""
    steps, log, snap = 16, 5, 8
    plain = [k for k in range(3, steps) if k % log and k % snap]
    worker = ROOT / "tests" / "_cuda_sync_worker.py"
    out = subprocess.run(
        [sys.executable, str(worker), ",".join(map(str, plain)), "run", str(TINY),
         f"out_dir={tmp_path}", "name=s", "device=cuda", *flags, f"steps={steps}",
         f"log_every={log}", f"checkpoint.every={snap}", "eval.every=null",
         "schedule.warmup_steps=2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"checked {len(plain)} plain steps" in out.stdout
