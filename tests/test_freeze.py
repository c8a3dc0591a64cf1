"""Frozen parameters (`requires_grad=False`, or a recipe's `freeze:` patterns): no gradient,
no optimizer state, no weight decay, no reduction; their bytes never change, in one process,
canonical micro-batches, fp16, EMA, under torchrun; and which params are trainable is part
of the state's structure, checked on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    Tied,
    assert_branch_resumes_bitwise,
    assert_states_equal,
    cli,
    toy_data,
    toy_model,
)

import functrain as ft
from functrain import checkpoint
from functrain.losses import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ["steps=12", "checkpoint.every=6", "eval.every=null", "log_every=6"]


def _frozen_first_layer(**kwargs) -> ft.TrainState:
    model = toy_model()
    for p in model[0].parameters():  # the first Linear
        p.requires_grad_(False)
    return ft.create(
        model,
        loss=cross_entropy(),
        optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),  # decay would move a frozen weight
        transforms=kwargs.pop("transforms", [ft.forward_backward(), ft.apply_optimizer()]),
        **kwargs,
    )


def _train(state: ft.TrainState, steps: int) -> ft.TrainState:
    x, y = toy_data(256)
    for i in range(steps):
        j = (i * 16) % 256
        state = ft.step(state, (x[j : j + 16], y[j : j + 16]))
    return state


def _leaves(td) -> dict:
    return {".".join(k): v for k, v in td.items(include_nested=True, leaves_only=True)}


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"transforms": [ft.forward_backward(micro_batch_size=4), ft.clip_by_global_norm(0.5),
                        ft.apply_optimizer(), ft.ema(0.9)]},
        {"precision": "fp16"},
    ],
    ids=["plain", "canonical-clip-ema", "fp16"],
)  # fmt: skip
def test_frozen_params_keep_their_bytes_and_get_no_optimizer_state(setup):
    state = _frozen_first_layer(**setup)
    frozen = {k: v.clone() for k, v in _leaves(state.frozen).items()}
    trainable = {k: v.clone() for k, v in _leaves(state.params).items()}
    assert sorted(frozen) == ["0.bias", "0.weight"] and "0.weight" not in trainable
    state = _train(state, 50)
    assert all(torch.equal(v, frozen[k]) for k, v in _leaves(state.frozen).items())
    assert any(not torch.equal(v, trainable[k]) for k, v in _leaves(state.params).items())
    opt_keys = {k for k in _leaves(state.opt) if "0.weight" in k or "0.bias" in k}
    assert not any(k.endswith(("mu.0.weight", "nu.0.weight", "mu.0.bias")) for k in opt_keys)
    assert all(not k.startswith("0.") for k in _leaves(state.ema))
    assert not any(t.requires_grad for t in _leaves(state.frozen).values())
    sd = state.state_dict()  # the module's own keys, frozen ones included
    assert list(sd) == list(toy_model().state_dict()) and torch.equal(
        sd["0.weight"], frozen["0.weight"]
    )


def test_a_model_whose_every_param_is_frozen_is_refused():
    model = toy_model()
    model.requires_grad_(False)
    with pytest.raises(ft.errors.ConfigError, match="nothing to train"):
        ft.create(model, loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2),
                  transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip


def test_a_snapshot_whose_trainable_params_differ_is_refused_by_name(tmp_path):
    state = _train(_frozen_first_layer(), 2)
    checkpoint.save(tmp_path / "state_2", state.tensors(), {"step": 2})
    tensors, _ = checkpoint.load(tmp_path / "state_2")
    everything_trainable = ft.create(
        toy_model(), loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
        transforms=[ft.forward_backward(), ft.apply_optimizer()],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"param 0\.weight is trainable now but frozen in the snapshot"
    ):
        everything_trainable.load(tensors)
    assert int(_frozen_first_layer().load(tensors).step) == 2


# ---------------------------------------------------------------- the recipe's freeze:


def test_recipe_freeze_keeps_the_matched_params_and_resumes_bitwise(tmp_path):
    freeze = "freeze=[pos.weight, 'blocks.*.ln*']"
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *SHORT, freeze, at=6, end=12)
    first, last = checkpoint.load(a / "state_6")[0], checkpoint.load(a / "state_12")[0]
    assert sorted(_leaves(last["frozen"])) == [
        "blocks.0.ln1.bias", "blocks.0.ln1.weight", "blocks.0.ln2.bias", "blocks.0.ln2.weight",
        "pos.weight",
    ]  # fmt: skip
    assert all(
        torch.equal(v, _leaves(first["frozen"])[k]) for k, v in _leaves(last["frozen"]).items()
    )
    assert not torch.equal(first["params", "tok", "weight"], last["params", "tok", "weight"])


def test_recipe_freeze_changed_on_resume_is_refused_naming_the_param(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight]", "--until", "6")
    for allow in ([], ["--allow-change", "freeze"]):  # the structure is checked first
        res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "--from", "latest", *allow,
                  check=False)  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "param pos.weight is trainable now but frozen in the snapshot" in res.stderr


def test_a_freeze_pattern_that_matches_nothing_is_refused_before_any_file(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", "freeze=[encoder.*]", check=False)
    assert res.returncode == 2
    assert "freeze: 'encoder.*' matches no parameter of the model" in res.stderr
    assert "tok.weight" in res.stderr and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_frozen_params_under_torchrun_stay_as_they_were(tmp_path, monkeypatch, parallel):
    from _dist_common import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["run", TINY, f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight, tok.weight]",
            f"parallel={parallel}", "step.0.micro_batches=1", "step.0.micro_batch_size=2"]  # fmt: skip
    launch(2, *args, "name=two")
    first = checkpoint.load(tmp_path / "two" / "state_6")[0]
    last = checkpoint.load(tmp_path / "two" / "state_12")[0]
    assert sorted(_leaves(last["frozen"])) == ["pos.weight", "tok.weight"]
    assert all(
        torch.equal(v, _leaves(first["frozen"])[k]) for k, v in _leaves(last["frozen"]).items()
    )
    assert not any("tok" in k or "pos" in k for k in _leaves(last["opt"]))
    if parallel == "ddp":  # canonical and unsharded: the bits of one process
        launch(1, *args, "name=one")
        assert checkpoint.digests(tmp_path / "one" / "state_12") == checkpoint.digests(
            tmp_path / "two" / "state_12"
        )


def test_trainable_only_snapshots_under_fsdp_hold_no_frozen_shard_and_resume_bitwise(
    tmp_path, monkeypatch
):
    from _dist_common import launch

    from functrain.recipe import load_recipe
    from functrain.run.build import build

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight, tok.weight]", "parallel=fsdp",
            "checkpoint.trainable_only=true"]  # fmt: skip
    launch(2, "run", TINY, *args, "name=a")
    tensors, manifest = checkpoint.load(tmp_path / "a" / "state_6")
    assert manifest["layout"] == "dcp" and manifest["trainable_only"]
    assert _leaves(tensors["frozen"]) == {} and _leaves(tensors["params"])
    # the frozen params gathered whole: the hash one process gives for the same init
    alone = build(load_recipe(TINY, [*args, "parallel=ddp"]))
    assert manifest["frozen_sha256"] == checkpoint.frozen_hash(alone.state)
    launch(2, "resume", TINY, *args, "name=a", "--from", "state_6", "--name", "b")
    assert checkpoint.digests(tmp_path / "b" / "state_12") == checkpoint.digests(
        tmp_path / "a" / "state_12"
    )
    res = launch(2, "resume", TINY, *args, "name=a", "freeze=[pos.weight]", "--from", "state_6",
                 "--name", "c", "--allow-change", "freeze", check=False)  # fmt: skip
    assert res.returncode != 0 and "missing params/tok/weight" in res.stderr


def test_an_unsharded_trainable_only_snapshot_resumes_under_fsdp_bitwise(tmp_path, monkeypatch):
    """Written by one process, the adapter-style snapshot lacks the frozen params; under
    FSDP each rank gathers the frozen ones it built to complete it, then keeps its rows.
    Canonical micro-batches: the same bits as resuming in one process."""
    from _dist_common import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"out_dir={tmp_path}", *SHORT, "freeze=[pos.weight, tok.weight]",
            "checkpoint.trainable_only=true", "step.0.micro_batches=1",
            "step.0.micro_batch_size=2"]  # fmt: skip
    launch(1, "run", TINY, *args, "name=a")
    assert checkpoint.read_manifest(tmp_path / "a" / "state_6").get("layout") != "dcp"
    launch(2, "resume", TINY, *args, "name=a", "parallel=fsdp", "--from", "state_6",
           "--name", "b", "--allow-change", "parallel")  # fmt: skip
    assert checkpoint.read_manifest(tmp_path / "b" / "state_12")["layout"] == "dcp"
    assert checkpoint.digests(tmp_path / "b" / "state_12") == checkpoint.digests(
        tmp_path / "a" / "state_12"
    )


# ---------------------------------------------------------------- LoRA and trainable_only


def _lora_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = transformers.GPT2LMHeadModel(config)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
        return peft.get_peft_model(base, lora)


def test_a_lora_adapter_trains_alone_and_resumes_bitwise_from_adapter_only_snapshots(tmp_path):
    from functrain.losses import model_loss

    def new_state():
        return ft.create(_lora_gpt2(), loss=model_loss(), optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
                         transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip

    ids = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, 64, 8)]

    def train(state, start, stop):
        for b in batches[start:stop]:
            state = ft.step(state, b)
        return state

    state = new_state()
    trainable = sorted(_leaves(state.params))
    assert trainable and all("lora_" in k for k in trainable)
    assert all("lora_" not in k for k in _leaves(state.frozen))
    moments = [k for k in _leaves(state.opt) if k.startswith(("mu.", "nu."))]
    assert len(moments) == 2 * len(trainable) and all("lora_" in k for k in moments)
    base = {k: v.clone() for k, v in _leaves(state.frozen).items()}
    frozen_hash = checkpoint.content_hash(base)
    meta = checkpoint.describe(frozen_sha256=frozen_hash)
    policy = checkpoint.Policy(trainable_only=True)
    with checkpoint.Snapshots(tmp_path, policy, meta=meta) as snapshots:
        snapshots.maybe_save(train(state, 0, 4), last=True)
    tensors, manifest = checkpoint.load(tmp_path / "state_4")
    assert manifest["trainable_only"] and _leaves(tensors["frozen"]) == {}
    on_disk = sum(f.stat().st_size for f in (tmp_path / "state_4").iterdir())
    assert on_disk < sum(v.numel() * 4 for v in base.values())  # the base is not in it
    resumed, _ = checkpoint.Snapshots(tmp_path, policy, meta=meta).restore(like=new_state())
    resumed = train(resumed, 4, 8)
    straight = train(new_state(), 0, 8)
    assert_states_equal(resumed.tensors(), straight.tensors())
    assert all(torch.equal(v, base[k]) for k, v in _leaves(straight.frozen).items())
    other = checkpoint.describe(frozen_sha256="0" * 64)  # another base
    with pytest.raises(ft.errors.MismatchError, match="trainable params only") as refused:
        checkpoint.Snapshots(tmp_path, meta=other).restore(like=new_state())
    assert refused.value.what == "init_from"


class _WithPooler(torch.nn.Module):
    """A model with a part the task never uses (a pooler, a second head)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.unused = toy_model(), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def test_a_trainable_param_the_loss_never_uses_is_named_not_a_raw_error():
    def state_of(model):
        return ft.create(model, loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2),
                         transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip

    with pytest.raises(ft.errors.ConfigError, match=r"2 trainable parameter\(s\) are not used"):
        _train(state_of(_WithPooler()), 1)
    model = _WithPooler()
    model.unused.requires_grad_(False)  # frozen: fine
    _train(state_of(model), 2)


def test_a_custom_loop_trainable_only_snapshot_records_its_base_and_refuses_another(tmp_path):
    state = _train(_frozen_first_layer(), 2)
    with checkpoint.Snapshots(tmp_path, checkpoint.Policy(trainable_only=True)) as snapshots:
        snapshots.maybe_save(state, last=True)
    manifest = checkpoint.read_manifest(tmp_path / "state_2")
    assert manifest["trainable_only"] and len(manifest["frozen_sha256"]) == 64
    restored, _ = checkpoint.Snapshots(tmp_path).restore(like=_frozen_first_layer())
    assert_states_equal(restored.tensors(), state.tensors())
    other = toy_model(seed=1)  # another base: other frozen bytes
    for p in other[0].parameters():
        p.requires_grad_(False)
    like = ft.create(other, loss=cross_entropy(), optimizer=ft.adamw(lr=1e-2, weight_decay=0.1),
                     transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip
    with pytest.raises(ft.errors.MismatchError, match="trainable params only"):
        checkpoint.Snapshots(tmp_path).restore(like=like)


def test_freezing_a_tied_weight_by_its_other_name_freezes_the_one_tensor(capsys):
    """`freeze: [lm_head.weight]` on a model whose head is tied to its embedding: the name
    is not in `named_parameters()` (it dedups), yet it names that tensor; it is frozen, and
    a warning says the embedding is frozen with it."""
    from functrain.errors import BuildError
    from functrain.run.build import _freeze

    model = Tied()
    _freeze(model, ["head.weight"])
    assert not model.emb.weight.requires_grad
    assert (
        "head.weight is tied to emb.weight (one tensor): both are frozen" in capsys.readouterr().err
    )
    model = Tied()
    _freeze(model, ["emb.weight"])  # by its first name: the head is frozen too, said so
    assert not model.head.weight.requires_grad
    assert (
        "emb.weight is tied to head.weight (one tensor): both are frozen" in capsys.readouterr().err
    )
    model = Tied()
    _freeze(model, ["emb.*", "head.*"])  # both names asked for: nothing to say
    assert not model.emb.weight.requires_grad and capsys.readouterr().err == ""
    with pytest.raises(BuildError, match="'lm_head.weight' matches no parameter"):
        _freeze(Tied(), ["lm_head.weight"])


def test_a_trainability_change_against_a_trainable_only_snapshot_is_named_both_ways(tmp_path):
    """A trainable_only snapshot holds no frozen param, but its manifest names them: a param
    trainable now but frozen then (or the reverse) is refused by name, not as "missing"."""
    args = [f"out_dir={tmp_path}", "steps=12", "checkpoint.every=6", "eval.every=null",
            "checkpoint.trainable_only=true"]  # fmt: skip
    cli("run", TINY, *args, "freeze=[pos.weight]", "--until", "6")
    for freeze, said in (("[]", "param pos.weight is trainable now but frozen in the snapshot"),
                         ("[pos.weight, tok.weight]", "param tok.weight is frozen now but "
                          "trainable in the snapshot")):  # fmt: skip
        res = cli("resume", TINY, *args, f"freeze={freeze}", "--from", "latest", "--name", "b",
                  "--allow-change", "freeze", check=False)  # fmt: skip
        assert res.returncode == 2 and said in res.stderr, res.stderr
    cli("resume", TINY, *args, "freeze=[pos.weight]", "--from", "latest")  # unchanged: fine
