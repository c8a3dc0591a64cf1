"""Fine-tuning: weights in from a file (`init_from`), losses for models that shift their own
labels or compute their own loss. The `transformers` tests need the `hf` extra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Tied, cli

from functrain import checkpoint
from functrain.errors import ConfigError
from functrain.losses import model_loss, next_token_cross_entropy
from functrain.models import GPT
from functrain.recipe import load_recipe
from functrain.run.build import build

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ["steps=8", "checkpoint.every=4", "eval.every=null", "log_every=4"]
GPT_ARGS = {"vocab_size": 256, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}


def _other_gpt(seed: int = 123) -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT(**GPT_ARGS, dropout=0.1)


def _params(td) -> dict:
    return {".".join(k): v for k, v in td.items(include_nested=True, leaves_only=True)}


# ---------------------------------------------------------------- init_from


def test_init_from_a_safetensors_file_starts_from_its_weights(tmp_path):
    from safetensors.torch import save_file

    source = _other_gpt().state_dict()
    save_file(source, str(tmp_path / "w.safetensors"))
    built = build(load_recipe(TINY, [f"init_from={tmp_path / 'w.safetensors'}"]))
    got = {**_params(built.state.params), **_params(built.state.frozen)}
    assert sorted(got) == sorted(source) and all(torch.equal(got[k], source[k]) for k in got)
    assert built.init_from["format"] == "safetensors" and len(built.init_from["sha256"]) == 64
    plain = build(load_recipe(TINY, []))
    assert not torch.equal(plain.state.params["tok", "weight"], got["tok.weight"])


def test_init_from_names_missing_and_unexpected_keys_and_renames_prefixes(tmp_path):
    from safetensors.torch import save_file

    source = {f"model.{k}": v for k, v in _other_gpt().state_dict().items()}
    save_file(source, str(tmp_path / "w.safetensors"))
    with pytest.raises(
        ConfigError, match=r"missing 16 \(tok\.weight.*unexpected 16 \(model\.blocks"
    ):
        build(load_recipe(TINY, [f"init_from={tmp_path / 'w.safetensors'}"]))
    built = build(load_recipe(TINY, [f"init_from={tmp_path / 'w.safetensors'}",
                                     "init_from_map={'model.': ''}"]))  # fmt: skip
    assert torch.equal(built.state.params["tok", "weight"], source["model.tok.weight"])


def test_init_from_a_snapshot_takes_its_weights_not_its_optimizer(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "name=A", "--until", "4")
    snap = tmp_path / "A" / "state_4"
    built = build(load_recipe(TINY, [f"init_from={snap}", "name=B"]))
    trained = _params(checkpoint.load(snap)[0]["params"])
    assert all(torch.equal(v, trained[k]) for k, v in _params(built.state.params).items())
    assert int(built.state.step) == 0
    assert all(float(t.abs().sum()) == 0 for t in _params(built.state.opt).values())


def test_the_manifest_records_init_from_and_a_changed_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file(_other_gpt().state_dict(), str(weights))
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, f"init_from={weights}", "--until", "4")
    shown = cli("inspect", tmp_path / "tiny" / "state_4").stdout
    assert f"init from {weights} (safetensors, sha256 " in shown
    save_file(_other_gpt(seed=7).state_dict(), str(weights))  # the file changed
    res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, f"init_from={weights}",
              "--from", "latest", check=False)  # fmt: skip
    assert res.returncode == 2 and "the weights the run started from differ" in res.stderr


def test_init_from_a_sharded_index_a_pickle_a_dtype_and_ties(tmp_path):
    import json

    from safetensors.torch import save_file

    from functrain.checkpoint import init_from
    from functrain.errors import SnapshotError

    source = _other_gpt().state_dict()
    names = sorted(source)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}  # fmt: skip
    (tmp_path / "sharded").mkdir()
    for file, keys in shards.items():
        save_file({k: source[k] for k in keys}, str(tmp_path / "sharded" / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = _other_gpt(seed=1)
    assert init_from(model, tmp_path / "sharded")["format"] == "pretrained"
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    index.write_text(json.dumps({"weight_map": {"tok.weight": "../w.safetensors"}}))
    with pytest.raises(SnapshotError, match="names shard files outside its directory"):
        init_from(_other_gpt(), tmp_path / "sharded")

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SnapshotError, match="pytorch_model.bin is a pickle, which can run code"):
        init_from(_other_gpt(), tmp_path / "pickled")

    tied = Tied(dtype=torch.bfloat16)  # a bf16 file into a float32 model: the model's dtype kept
    save_file({"emb.weight": tied.emb.weight.detach()}, str(tmp_path / "bf16.safetensors"))
    model = Tied()
    init_from(model, tmp_path / "bf16.safetensors")  # the tied name may be absent
    assert model.emb.weight.dtype == torch.float32 and model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, tied.emb.weight.float())

    w = torch.randn(4, 3)
    save_file({"emb.weight": w, "head.weight": w + 1}, str(tmp_path / "untied.safetensors"))
    with pytest.raises(ConfigError, match="different values for emb.weight and head.weight"):
        init_from(Tied(), tmp_path / "untied.safetensors")
    save_file({"emb.weight": w, "head.weight": w.clone()}, str(tmp_path / "both.safetensors"))
    init_from(model, tmp_path / "both.safetensors")  # both names, equal values: fine
    assert torch.equal(model.head.weight, w)


def test_init_from_a_missing_path_is_refused_by_name(tmp_path):
    res = cli("run", TINY, f"out_dir={tmp_path}", f"init_from={tmp_path / 'nope'}", check=False)
    assert res.returncode == 2 and "init_from:" in res.stderr and "not found" in res.stderr
    assert not (tmp_path / "tiny").exists()


# ---------------------------------------------------------------- losses


class _Out(dict):
    """A ModelOutput-like result: a mapping with attribute access."""

    __getattr__ = dict.get


def test_next_token_loss_shifts_hf_style_labels_and_ignores_minus_100():
    model = _other_gpt().eval()
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    hf = next_token_cross_entropy(shift=True)(model, {"input_ids": x, "labels": x})
    logits = model(x)[:, :-1]  # the same predictions, positions 0..T-2
    want = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    assert torch.equal(hf, want)
    masked = x.clone()
    masked[:, :8] = -100  # only positions 8.. count
    got = next_token_cross_entropy(shift=True)(model, {"input_ids": x, "labels": masked})
    want = F.cross_entropy(logits[:, 7:].reshape(-1, 256), x[:, 8:].reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the same positions count


def test_shift_trains_next_token_prediction_where_no_shift_trains_a_copy():
    import functrain as ft

    x = torch.randint(0, 64, (256, 17), generator=torch.Generator().manual_seed(0))
    x[:, 1::2] = (x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1) % 64  # next token = this + 1

    def train(shift: bool) -> GPT:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = GPT(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
        state = ft.create(model, loss=next_token_cross_entropy(shift=shift),
                          optimizer=ft.adamw(lr=3e-3),
                          transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip
        for i in range(60):
            b = x[(i * 16) % 256 : (i * 16) % 256 + 16]
            state = ft.step(state, {"input_ids": b, "labels": b})
        return ft.load_into(GPT(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                dropout=0.0), state).eval()  # fmt: skip

    held = x[:64]
    right = next_token_cross_entropy(shift=True)
    next_token, copy = train(shift=True), train(shift=False)
    with torch.no_grad():
        shifted = right(next_token, {"input_ids": held, "labels": held})
        copied = right(copy, {"input_ids": held, "labels": held})
    assert shifted < copied  # trained on the next token, not on copying the input


def test_model_loss_takes_the_loss_the_model_returns():
    class Own(torch.nn.Module):
        def __init__(self, returns):
            super().__init__()
            self.w, self.returns = torch.nn.Parameter(torch.ones(())), returns

        def forward(self, input_ids, labels=None):
            loss = (self.w * input_ids.float()).mean()
            return {"attr": _Out(loss=loss), "dict": {"loss": loss}, "tuple": (loss, None),
                    "logits": input_ids.float()}[self.returns]  # fmt: skip

    batch = {"input_ids": torch.arange(4), "labels": torch.arange(4)}
    for kind in ("attr", "dict", "tuple"):
        assert model_loss()(Own(kind), batch) == 1.5
    assert model_loss()(Own("tuple"), (torch.arange(4),)) == 1.5
    with pytest.raises(TypeError, match=r"model_loss: the model returned Tensor\[4\] float32"):
        model_loss()(Own("logits"), batch)


# ---------------------------------------------------------------- transformers (extra hf)


def _hf_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, tie_word_embeddings=True)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)


def test_init_from_a_save_pretrained_directory_with_tied_weights(tmp_path):
    from functrain.checkpoint import init_from

    source = _hf_gpt2(seed=0)
    source.save_pretrained(tmp_path / "gpt2")
    model = _hf_gpt2(seed=1)
    info = init_from(model, tmp_path / "gpt2")
    assert info["format"] == "pretrained"
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_hf_models_own_loss_matches_the_shifted_next_token_loss():
    model = _hf_gpt2().eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    own = model_loss()(model, {"input_ids": x, "labels": x})
    ours = next_token_cross_entropy(shift=True)(model, {"input_ids": x, "labels": x})
    assert torch.allclose(own, ours, rtol=1e-5)  # the same task; op order may differ


# ---------------------------------------------------------------- export, sample, other data


def _hf_recipe(tmp_path: Path) -> Path:
    (tmp_path / "hf_models.py").write_text(
        "import transformers\n"
        "def gpt2():\n"
        "    return transformers.GPT2LMHeadModel(transformers.GPT2Config(\n"
        "        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2))\n"
    )
    return tmp_path


def test_export_of_a_tied_model_loads_strictly_and_as_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    env = {"PYTHONPATH": str(_hf_recipe(tmp_path))}
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "model={_component_: hf_models.gpt2}",
        "--until", "4", env=env)  # fmt: skip
    snap = tmp_path / "tiny" / "state_4"
    assert checkpoint.read_manifest(snap)["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    cli("export", snap, "--out", tmp_path / "w.safetensors", env=env)
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2))  # fmt: skip
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))  # strict: every key
    res = cli("export", snap, "--hf", tmp_path / "hf", env=env, check=False)
    assert res.returncode == 2 and "hf_models.gpt2, which is not one of functrain's" in res.stderr
    recipe = tmp_path / "tiny" / "recipe.yaml"  # not functrain's model: built from the recipe
    cli("export", snap, "--hf", tmp_path / "hf", "--recipe", recipe, env=env)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in fresh.state_dict().items())
    res = cli("sample", snap, "--tokens", "3", "--recipe", recipe, env=env)
    assert res.returncode == 0  # an HF causal LM returns logits in its output: sample works


def test_export_of_a_tied_model_trained_under_fsdp_loads_strictly(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from _dist_common import launch
    from safetensors.torch import load_file

    monkeypatch.setenv("PYTHONPATH", str(_hf_recipe(tmp_path)))
    launch(2, "run", TINY, f"out_dir={tmp_path}", *SHORT, "model={_component_: hf_models.gpt2}",
           "parallel=fsdp", "--until", "4")  # fmt: skip
    snap = tmp_path / "tiny" / "state_4"  # the sharded module keeps its ties: recorded
    assert checkpoint.read_manifest(snap)["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    cli("export", snap, "--out", tmp_path / "w.safetensors")
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2))  # fmt: skip
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))  # strict: every key


def test_export_hf_and_sample_refuse_what_they_cannot_do(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "--until", "4")
    snap = tmp_path / "tiny" / "state_4"
    res = cli("export", snap, "--hf", tmp_path / "hf", check=False)
    assert res.returncode == 2 and "export --hf needs a transformers model" in res.stderr
    import functrain as ft
    from functrain.losses import cross_entropy
    from functrain.models import MLP

    spec = {"in_features": 2, "hidden": 4, "classes": 256}
    state = ft.create(MLP(**spec), loss=cross_entropy(), optimizer=ft.adamw(lr=1e-3),
                      transforms=[ft.forward_backward(), ft.apply_optimizer()])  # fmt: skip
    recipe = {"model": {"_component_": "functrain.models.MLP", **spec}}
    checkpoint.save(tmp_path / "mlp" / "state_1", state.tensors(), {"step": 1, "recipe": recipe})
    res = cli("sample", tmp_path / "mlp" / "state_1", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "sample needs a language model" in res.stderr and "functrain.models.MLP" in res.stderr


def test_a_branch_onto_other_data_is_refused_then_accepted_when_allowed(tmp_path):
    cli("run", TINY, f"out_dir={tmp_path}", *SHORT, "--until", "4")
    other = ["data.dataset.max_bytes=150000"]
    res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, *other, "--from", "latest",
              "--name", "B", "--allow-change", "data.dataset.max_bytes", check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr  # the content change follows the allowed key
    lineage = checkpoint.read_manifest(tmp_path / "B" / "state_8")["lineage"][-1]
    assert any(c.startswith("data: data content changed") for c in lineage["changes"])
    res = cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "data.batch_size=16",
              "--from", "state_4", "--name", "C", check=False)  # fmt: skip
    assert res.returncode == 2 and "--allow-change data.batch_size" in res.stderr
    cli("resume", TINY, f"out_dir={tmp_path}", *SHORT, "data.batch_size=16",
        "--from", "state_4", "--name", "C", "--allow-change", "data.batch_size")  # fmt: skip


def test_trainable_only_snapshots_take_the_frozen_params_from_init_from(tmp_path):
    from conftest import assert_branch_resumes_bitwise
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file(_other_gpt().state_dict(), str(weights))
    args = [*SHORT, f"init_from={weights}", "freeze=[tok.weight, pos.weight]",
            "checkpoint.trainable_only=true"]  # fmt: skip
    a, _, _ = assert_branch_resumes_bitwise(tmp_path, TINY, *args, at=4, end=8)
    tensors, manifest = checkpoint.load(a / "state_4")
    assert manifest["trainable_only"] and _params(tensors["frozen"]) == {}
    assert len(manifest["frozen_sha256"]) == 64
    res = cli("export", a / "state_4", "--out", tmp_path / "w2.safetensors", check=False)
    assert res.returncode == 2 and "holds the trainable params only" in res.stderr
    save_file(_other_gpt(seed=5).state_dict(), str(weights))  # another base
    res = cli("resume", TINY, f"out_dir={tmp_path}", "name=A", *args, "--from", "state_4",
              "--name", "C", check=False)  # fmt: skip
    assert res.returncode == 2 and "the weights the run started from differ" in res.stderr
