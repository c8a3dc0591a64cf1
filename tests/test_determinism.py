"""`determinism: strict | warn | off` and `tf32`: what each sets, records and promises.

strict (default) turns on deterministic algorithms on every device; an op without a
deterministic kernel (`put_` with a repeated index, on the CPU too) stops the run before
step 1, naming the op and the setting. warn and off let it run; their snapshots say they
are not promised bitwise (manifest, inspect, resume, check).
"""

from __future__ import annotations

import os

import orjson
from _dist_common import ROOT, TINY
from conftest import cli, rewrite_manifest

from functrain import checkpoint

ON_PATH = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
PUT = "model._component_=_determinism_components.PutGPT"
SHORT = ("steps=4", "schedule.warmup_steps=1", "checkpoint.every=2", "eval.every=null")
SHORT += ("log_every=2",)


def test_strict_stops_before_step_1_at_an_op_without_a_deterministic_kernel(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "name=s", *SHORT, PUT, check=False, env=ON_PATH)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "determinism: strict: the model ran put_" in res.stderr, res.stderr
    assert "determinism: warn" in res.stderr and "determinism: off" in res.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_warn_runs_it_and_every_tool_says_the_run_is_not_promised_bitwise(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "name=w", *SHORT, PUT, "determinism=warn",
              env=ON_PATH)  # fmt: skip
    assert "determinism: warn: ops without a deterministic kernel may run" in res.stderr
    run = tmp_path / "w"
    settings = checkpoint.read_manifest(run / "state_4")["determinism"]
    assert settings["mode"] == "warn" and settings["deterministic_algorithms"] is True
    shown = cli("inspect", run / "state_4").stdout
    assert "bitwise   NOT PROMISED: trained with determinism: warn" in shown, shown
    report = orjson.loads(cli("inspect", run / "state_4", "--json").stdout)
    assert report["bitwise"] is False
    listed = cli("inspect", run).stdout
    assert listed.count("not promised bitwise (determinism)") == 2, listed
    res = cli("resume", TINY, f"out_dir={tmp_path}", "name=w", *SHORT, PUT, "determinism=warn",
              "--from", "state_2", "--name", "w2", env=ON_PATH)  # fmt: skip
    assert "not promised the bits of an unbroken one" in res.stderr, res.stderr


def test_off_sets_torch_defaults_and_strict_is_promised(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", "name=o", *SHORT, PUT, "determinism=off", env=ON_PATH)
    settings = checkpoint.read_manifest(tmp_path / "o" / "state_4")["determinism"]
    assert settings == {"mode": "off", "tf32": False, "deterministic_algorithms": False}
    cli("run", TINY, f"out_dir={tmp_path}", "name=s", *SHORT, "tf32=true")
    strict = tmp_path / "s" / "state_4"
    settings = checkpoint.read_manifest(strict)["determinism"]
    assert settings == {"mode": "strict", "tf32": True, "deterministic_algorithms": True}
    assert "NOT PROMISED" not in cli("inspect", strict).stdout
    assert orjson.loads(cli("inspect", strict, "--json").stdout)["bitwise"] is True


def test_a_resume_may_not_change_the_mode_or_tf32_silently(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", "name=s", *SHORT)
    for change in ("determinism=warn", "tf32=true"):
        res = cli("resume", TINY, f"out_dir={tmp_path}", "name=s", *SHORT, change,
                  "--from", "state_2", "--name", "x", check=False)  # fmt: skip
        key = change.split("=")[0]
        assert res.returncode == 2 and f"{key}: " in res.stderr, res.stderr


def test_check_says_a_warn_recipe_is_not_promised(tmp_path):
    res = cli(
        "check",
        TINY,
        "--steps",
        "4",
        "schedule.warmup_steps=1",
        "determinism=warn",
        "eval.every=null",
    )
    text = res.stdout + res.stderr
    assert "check: note: determinism: warn: nondeterministic kernels are allowed" in text, text
    assert "check: bitwise (this time: not promised, see note)" in text, text


def test_a_snapshot_from_before_the_modes_resumes_as_strict_and_bitwise(tmp_path):
    """A manifest whose recipe has no `determinism` or `tf32` (and whose settings no
    `mode`) was written by a strict run without TF32: it resumes without --allow-change,
    promised bitwise."""
    cli("run", TINY, f"out_dir={tmp_path}", "name=a", *SHORT)
    snap = tmp_path / "a" / "state_2"
    manifest = checkpoint.read_manifest(snap)
    for key in ("determinism", "tf32"):
        del manifest["recipe"][key]
    for key in ("mode", "tf32"):
        del manifest["determinism"][key]
    rewrite_manifest(snap, manifest)
    res = cli("resume", TINY, f"out_dir={tmp_path}", "name=a", *SHORT, "--from", "state_2",
              "--name", "b")  # fmt: skip
    assert "not promised" not in res.stderr, res.stderr
    assert checkpoint.digests(tmp_path / "b" / "state_4") == checkpoint.digests(
        tmp_path / "a" / "state_4"
    )
