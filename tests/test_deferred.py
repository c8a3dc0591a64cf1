"""Models built on the meta device and made after sharding (`functrain.deferred`): bitwise
the values of an eager build, on 1, 2 and 4 processes, FSDP and DDP."""

from __future__ import annotations

import subprocess

import pytest
import torch
from _dist_common import ROOT, TINY, _env, _torchrun_cmd

from functrain import deferred, rng
from functrain.models import GPT, MLP
from functrain.recipe import load_recipe
from functrain.run.build import build

WORKER = ROOT / "tests" / "_init_worker.py"
ARGS = ("model.n_layer=2", "model.n_embd=48", "model.n_head=4", "seed=3", "data.batch_size=12")


@pytest.mark.parametrize(
    "make",
    [lambda: GPT(n_layer=2, n_embd=64, n_head=4, block_size=16, vocab_size=64), MLP],
    ids=["gpt", "mlp"],
)
def test_a_replay_gives_the_eager_values_bitwise(make):
    with rng.seeded(11):
        eager = make()
    later = deferred.record(make)
    assert all(p.is_meta for p in later.module.parameters())  # nothing was made yet
    got = {}
    with rng.seeded(11):
        later.materialize(lambda name, t: got.__setitem__(name, t.clone()))
    want = dict(eager.named_parameters()) | dict(eager.named_buffers())
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_a_constructor_that_reads_values_is_not_recordable():
    class Reads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3))
            self.n = int(self.w.abs().argmax())

    with pytest.raises(deferred.NotRecordable):
        deferred.record(Reads)


@pytest.mark.parametrize(("nproc", "parallel"), [(2, "fsdp"), (4, "fsdp"), (2, "ddp")])
def test_every_rank_makes_its_part_of_the_eager_init(tmp_path, nproc, parallel):
    out = tmp_path / "init.pt"
    cmd = _torchrun_cmd(nproc, [str(WORKER), str(out), str(TINY), *ARGS, f"parallel={parallel}"])
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = torch.load(out, weights_only=True)
    assert found["deferred"]  # the meta path ran
    eager = build(load_recipe(TINY, list(ARGS))).state.tensors()
    for key, t in found["tensors"].items():
        entry, _, name = key.partition("/")
        assert torch.equal(t, eager[(entry, *name.split("."))]), key
    assert len(found["tensors"]) == len(list(eager.select("params", "buffers").keys(True, True)))


def test_only_a_class_that_says_so_itself_is_built_on_meta_and_a_failure_builds_eagerly(
    monkeypatch, capsys
):
    from functrain.distributed import Context
    from functrain.run import build as build_lib

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    two = Context(world_size=2, rank=0)
    recipe = load_recipe(TINY, [])
    assert build_lib._deferred(recipe, two) is not None  # functrain's GPT
    assert build_lib._deferred(recipe, Context()) is None  # one process: eager
    mine = load_recipe(TINY, ["model._component_=_determinism_components.MyGPT"])
    assert build_lib._deferred(mine, two) is None  # inherited, not said: eager
    reads = load_recipe(TINY, ["model._component_=_determinism_components.ReadsOnInit"])
    assert build_lib._deferred(reads, two) is None
    assert "built eagerly on every rank" in capsys.readouterr().err
