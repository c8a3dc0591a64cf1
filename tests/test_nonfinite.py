"""The non-finite guard (`nan_policy`): "stop" ends a run at a NaN or inf, naming the step,
and saves nothing of it; "skip" leaves such updates out, counted; retention never deletes
the last finite snapshot; `inspect` flags non-finite entries; older snapshots, written
before the counters existed, still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_states_equal, cli, toy_data, toy_model

import functrain as ft
from functrain import checkpoint
from functrain.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
DIVERGE = ["optim.lr=1e6", "eval.every=null"]  # AdamW at this LR makes a NaN within steps


def _finite(snapshot: Path) -> bool:
    tensors = checkpoint.load(snapshot)[0]
    return all(bool(t.isfinite().all()) for t in tensors["params"].values(True, True))


def test_stop_ends_the_run_naming_the_step_and_saves_nothing_after_it(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", *DIVERGE, "steps=40", "checkpoint.every=1",
              "log_every=20", check=False)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "gave a non-finite loss or gradients" in res.stderr
    step = int(res.stderr.split("functrain run: error: step ")[1].split()[0])
    snapshots = checkpoint.list_snapshots(tmp_path / "tiny")
    assert [s for s, _ in snapshots] == list(range(1, step))  # every one before it, none after
    assert all(_finite(p) and checkpoint.read_manifest(p)["finite"] for _, p in snapshots)
    assert f"resume from {snapshots[-1][1]}" in res.stderr
    # the same recipe under `continue` shows that step `step` is the first that went bad
    cli("run", TINY, f"out_dir={tmp_path}", "name=cont", *DIVERGE, "steps=40",
        "checkpoint.every=1", "log_every=20", "nan_policy=continue", "--until", step)  # fmt: skip
    assert _finite(tmp_path / "cont" / f"state_{step - 1}")
    assert not checkpoint.read_manifest(tmp_path / "cont" / f"state_{step}")["finite"]


def test_retention_keeps_the_last_finite_snapshot_and_inspect_flags_the_others(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *DIVERGE, "steps=12", "checkpoint.every=2",
        "checkpoint.keep_last=1", "nan_policy=continue")  # fmt: skip
    run = tmp_path / "tiny"
    kept = [s for s, _ in checkpoint.list_snapshots(run)]
    assert len(kept) == 2 and kept[-1] == 12  # the newest, and the newest finite one
    assert _finite(run / f"state_{kept[0]}") and not _finite(run / "state_12")
    res = cli("inspect", run / "state_12")
    assert "finite    NO" in res.stdout and "NON-FINITE" in res.stdout
    assert "NON-FINITE" not in cli("inspect", run / f"state_{kept[0]}").stdout
    res = cli("inspect", run)
    assert res.stdout.count("NON-FINITE") == 1


def _poisoned(at: int):
    """toy batches of 16; the batch of step `at` (1-based) holds a NaN input."""
    x, y = toy_data(256)
    for i in range(8):
        xb = x[i * 16 : (i + 1) * 16].clone()
        if i + 1 == at:
            xb[0, 0] = float("nan")
        yield xb, y[i * 16 : (i + 1) * 16]


def _train(policy: str, at: int) -> list[ft.TrainState]:
    """The state after each of 8 steps, the batch of step `at` poisoned."""
    state = ft.create(
        toy_model(),
        loss=cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
        transforms=[ft.forward_backward(), ft.apply_optimizer()],
        nan_policy=policy,
    )
    out = []
    for batch in _poisoned(at):
        state = ft.step(state, batch, donate=False)
        out.append(state)
    return out


def test_skip_leaves_the_bad_update_out_counted_and_the_rest_bitwise(tmp_path):
    states = _train("skip", at=3)
    before, after = states[1].tensors(), states[2].tensors()  # steps 2 and 3
    for entry in ("params", "opt"):
        assert_states_equal(before[entry], after[entry])  # step 3 changed nothing
    assert int(after["stats", "nonfinite_steps"]) == 1
    assert int(after["stats", "first_nonfinite"]) == 3
    last = states[-1].tensors()
    assert all(bool(t.isfinite().all()) for t in last["params"].values(True, True))
    assert int(last["stats", "nonfinite_steps"]) == 1
    # a clean run is the same bits under every policy: the mask changes nothing
    clean = [_train(p, at=99)[-1].tensors() for p in ("stop", "skip", "continue")]
    for other in clean[1:]:
        assert_states_equal(clean[0].exclude("metrics"), other.exclude("metrics"))


def test_a_nan_loss_with_finite_gradients_is_not_counted_and_trains_alike_under_every_policy():
    """A batch whose targets are all -100 (a fully masked batch, common in fine-tuning):
    its loss is a mean over no target, NaN, and its gradients are zeros. Nothing non-finite
    reaches the params, so no policy counts it or stops: the three give the same bits."""

    def batches():
        for i, (x, y) in enumerate(_poisoned(at=99)):
            yield x, torch.full_like(y, -100) if i + 1 == 3 else y

    finals = []
    for policy in ("stop", "skip", "continue"):
        state = ft.create(toy_model(), loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2),
                          transforms=[ft.forward_backward(), ft.apply_optimizer()],
                          nan_policy=policy)  # fmt: skip
        for i, batch in enumerate(batches()):
            state = ft.step(state, batch, donate=False)
            if i + 1 == 3:
                assert state.metrics["loss"].isnan(), policy  # logged as it is
        assert int(state.stats["nonfinite_steps"]) == 0, policy
        finals.append(state.tensors())
    for other in finals[1:]:
        assert_states_equal(
            finals[0].exclude("metrics", "stats"), other.exclude("metrics", "stats")
        )
    assert all(bool(t.isfinite().all()) for t in finals[0]["params"].values(True, True))


def test_stop_in_a_loop_of_your_own_refuses_to_save_the_bad_state(tmp_path):
    states = _train("stop", at=3)
    assert int(states[-1].stats["first_nonfinite"]) == 3
    with checkpoint.Snapshots(tmp_path, checkpoint.Policy(every=1)) as snapshots:
        assert snapshots.maybe_save(states[1])  # step 2: finite
        with pytest.raises(checkpoint.NonFiniteError, match="step 3 gave a non-finite"):
            snapshots.maybe_save(states[3])
    assert [s for s, _ in checkpoint.list_snapshots(tmp_path)] == [2]


def test_a_snapshot_written_before_the_counters_existed_still_loads(tmp_path):
    state = _train("stop", at=99)[2]
    tensors = state.tensors()
    old = tensors.exclude(("stats", "nonfinite_steps"), ("stats", "first_nonfinite"))
    checkpoint.save(tmp_path / "state_3", old, {"step": 3})
    fresh = _train("stop", at=99)[0]
    loaded = fresh.load(checkpoint.load(tmp_path / "state_3")[0])
    assert_states_equal(loaded.tensors().exclude("stats"), tensors.exclude("stats"))
    assert int(loaded.stats["nonfinite_steps"]) == 0
    assert int(loaded.stats["first_nonfinite"]) == -1
    assert torch.equal(loaded.stats["loss_ema"], state.stats["loss_ema"])


def test_an_older_snapshot_read_in_place_gets_step_0_counters_not_the_trial_steps(tmp_path):
    """A resume reads its snapshot into the state the trial step spent: counters the
    snapshot lacks must come back at their step-0 values, whatever that step left there."""
    state = _train("stop", at=99)[2]
    tensors = state.tensors()
    old = tensors.exclude(("stats", "nonfinite_steps"), ("stats", "first_nonfinite"))
    path = checkpoint.save(tmp_path / "state_3", old, {"step": 3})
    manifest = checkpoint.read_manifest(path)
    for read_whole in (False, True):
        spent = _train("stop", at=99)[0]
        spent.stats["nonfinite_steps"].fill_(5)  # as if the trial step had gone non-finite
        spent.stats["first_nonfinite"].fill_(1)
        whole = checkpoint.load(path)[0] if read_whole else None
        loaded = checkpoint.Snapshots.place(path, whole, manifest, spent, in_place=True)
        assert_states_equal(loaded.tensors().exclude("stats"), tensors.exclude("stats"))
        assert int(loaded.stats["nonfinite_steps"]) == 0
        assert int(loaded.stats["first_nonfinite"]) == -1
