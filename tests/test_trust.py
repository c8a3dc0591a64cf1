"""Loading a snapshot runs no code, ever: a snapshot may come from anyone.

Two ways in were found and closed: a manifest whose `model` names any callable (`sample`
and `export --hf` built it), and a DCP `.metadata` pickle whose global resolves through an
allowed module's imports (`torch.distributed.checkpoint.metadata` + `os.system`). Each
crafted snapshot here would `touch MARKER` in the working directory; the marker must
never appear.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dist_cp
from conftest import cli, rewrite_manifest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from functrain import checkpoint
from functrain.checkpoint import dcp, raw
from functrain.cli.rebuild import rebuild_model
from functrain.errors import RecipeError, RunError, SnapshotError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
SHORT = ["steps=2", "schedule.warmup_steps=1", "checkpoint.every=null", "eval.every=null"]
#: What a crafted snapshot runs, in the working directory of the command (tmp_path).
TOUCH = "touch MARKER"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run's last snapshot (raw layout): the real thing the crafted ones start from."""
    out = tmp_path_factory.mktemp("trained")
    cli("run", TINY, f"out_dir={out}", *SHORT)
    return out / "tiny" / "state_2"


@pytest.fixture(scope="module")
def sharded(trained, tmp_path_factory) -> Path:
    """The same snapshot in the dcp layout (as an FSDP run writes it), made in one process."""
    tensors, manifest = checkpoint.load(trained)
    final = tmp_path_factory.mktemp("sharded") / "tiny" / "state_2"
    tmp = final.with_name("partial")
    flat = {k if isinstance(k, str) else "/".join(k): v
            for k, v in tensors.items(include_nested=True, leaves_only=True)}  # fmt: skip
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dist_cp.save(flat, storage_writer=dist_cp.FileSystemWriter(tmp), no_dist=True)
    meta = {k: v for k, v in manifest.items() if k not in raw._RESERVED}
    dcp._publish(tmp, final, tensors, meta)
    assert checkpoint.verify(final) == [] and manifest["recipe"]["model"]["_component_"]
    return final


def _copy(snapshot: Path, tmp_path: Path) -> Path:
    to = tmp_path / "runs" / "tiny" / snapshot.name
    shutil.copytree(snapshot, to)
    return to


def _set_manifest(snapshot: Path, change) -> None:
    """Edit the manifest as an attacker would: its digest made anew."""
    manifest = json.loads((snapshot / checkpoint.MANIFEST).read_text())
    change(manifest)
    rewrite_manifest(snapshot, manifest)


def _reseal(snapshot: Path, name: str, data: bytes) -> None:
    """Replace one file and record its size and crc32: a crafted snapshot checks out."""
    (snapshot / name).write_bytes(data)

    def files(m: dict) -> None:
        m["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}

    _set_manifest(snapshot, files)


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _stack_global(module: str, name: str, arg: str) -> bytes:
    """A protocol 4 pickle calling module.name(arg) (STACK_GLOBAL, TUPLE1, REDUCE)."""
    return b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93" + _unicode(arg) + b"\x85R."


EVIL_METADATA = _stack_global("torch.distributed.checkpoint.metadata", "os.system", TOUCH)


def _refused(res, *named: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "functrain" in res.stderr.splitlines()[0], res.stderr
    for text in named:
        assert text in res.stderr, res.stderr


# ---------------------------------------------------------------- the manifest's model


def test_a_manifest_naming_other_code_is_refused_by_sample_and_export(trained, tmp_path):
    snap = _copy(trained, tmp_path)
    evil = {"_component_": "subprocess.call", "args": TOUCH, "shell": True}
    _set_manifest(snap, lambda m: m["recipe"].update(model=evil))
    for flags in ([], ["--trust-recipe"]):
        for command in (["sample", snap], ["export", snap, "--hf", tmp_path / "hf"]):
            res = cli(*command, *flags, cwd=tmp_path, check=False)
            _refused(res, "subprocess.call", "--recipe RECIPE.yaml")
            assert ("--trust-recipe if you wrote" in res.stderr) == (not flags)
            assert ("is not a torch.nn.Module class" in res.stderr) == bool(flags)
    assert cli("inspect", snap, cwd=tmp_path).returncode == 0  # inspect builds nothing
    cli("export", snap, "--out", tmp_path / "w.safetensors", cwd=tmp_path)  # nor does --out
    res = cli("sample", snap, "--recipe", TINY, "--tokens", "3", cwd=tmp_path)  # the user's
    assert res.stdout.startswith("\n")
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "hf").exists()


def test_the_shipped_models_rebuild_unasked_and_nothing_else_is_imported(
    trained, tmp_path, monkeypatch
):
    manifest = checkpoint.read_manifest(trained)
    assert type(rebuild_model(trained, manifest)).__name__ == "GPT"  # sample runs/lm/state_N
    (tmp_path / "trap.py").write_text(f"import os\nos.system({TOUCH!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    refusals = {
        "trap.Model": "is not one of functrain's own models",
        "functrain.models.gpt.torch.nn.Linear": "is not one of functrain's own models",
        "functrain.models.gpt.F.relu": "is not a torch.nn.Module class",
        "functrain.modelsx.GPT": "is not one of functrain's own models",
    }
    for target, why in refusals.items():
        crafted = {**manifest, "recipe": {"model": {"_component_": target}}}
        with pytest.raises(RunError, match=f"names the model {target}, which {why}"):
            rebuild_model(trained, crafted)
    nested = {"_component_": "functrain.models.GPT", "n_layer": {"_component_": "trap.n"}}
    for trust in (False, True):
        with pytest.raises(RunError, match=r"takes components as arguments \(n_layer\)"):
            rebuild_model(trained, {**manifest, "recipe": {"model": nested}}, trust=trust)
    assert "trap" not in sys.modules and not (tmp_path / "MARKER").exists()
    bad_args = {"_component_": "functrain.models.GPT", "layers": 2}
    with pytest.raises(RecipeError, match="model.layers: unknown parameter"):
        rebuild_model(trained, {**manifest, "recipe": {"model": bad_args}})
    linear = {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3}
    trusted = rebuild_model(trained, {**manifest, "recipe": {"model": linear}}, trust=True)
    assert isinstance(trusted, torch.nn.Linear)  # --trust-recipe: any nn.Module class


_FORBIDDEN_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                     "subprocess.Popen", "pty.spawn", "shutil.rmtree", "os.remove", "os.rmdir")  # fmt: skip


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value, now and then a component naming dangerous code."""
    kinds = ["none", "bool", "int", "float", "str", "component"]
    kind = rng.choice(kinds + (["list", "dict"] if depth < 3 else []))
    if kind == "component":
        return {"_component_": _target(rng), **{f"a{i}": _junk(rng, depth + 1) for i in range(2)}}
    if kind == "list":
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == "dict":
        return {rng.choice(["x", "n_layer", "_component_", "", "é"]): _junk(rng, depth + 1)
                for _ in range(rng.randrange(4))}  # fmt: skip
    return {"none": None, "bool": rng.random() < 0.5, "int": rng.randrange(-(2**70), 2**70),
            "float": rng.choice([0.5, float("inf"), -1e308]), "str": rng.choice(["", "x" * 300, "\0", "../.."]),
            }[kind]  # fmt: skip


def _target(rng: random.Random):
    module, name = rng.choice(_DANGEROUS)
    return rng.choice([
        f"{module}.{name}", f"functrain.models.{module}.{name}", f"functrain.models.gpt.{module}.{name}",
        f"functrain.models.gpt.torch.nn.{rng.choice(['Linear', 'Module'])}", "trap.Model",
        "functrain.models.GPT", "functrain.models.MLP", "functrain.models", "functrain.models.",
        "functrain.step.forward_backward", "functrain.models.GPT.__init__", "functrain.models.gpt.F.relu",
        "", ".", "functrain..models.GPT", "functrain.models.GPT\nos.system", 42, None, ["os.system"],
    ])  # fmt: skip


def _crafted_manifests(manifest: dict, rng: random.Random):
    """The real manifest with a random `recipe.model`, a random `recipe`, or random fields."""
    for _ in range(400):
        m = json.loads(json.dumps(manifest))
        roll = rng.random()
        if roll < 0.6:
            model = {"_component_": _target(rng)}
            model.update({rng.choice(["n_layer", "vocab_size", "in_features", "x", "_component_"]):
                          _junk(rng) for _ in range(rng.randrange(4))})  # fmt: skip
            m["recipe"] = {**m["recipe"], "model": model}
        elif roll < 0.8:
            m["recipe"] = _junk(rng)
        else:
            for key in rng.sample(sorted(m), 3):
                m[key] = _junk(rng)
        yield m


def test_random_manifests_build_nothing_but_functrains_own_models(trained, tmp_path, monkeypatch):
    """A fuzz of manifests: each either rebuilds one of functrain's own models or is refused
    (RunError / RecipeError); no process is started, nothing deleted, no other module imported."""
    (tmp_path / "trap.py").write_text(f"import os\nos.system({TOUCH!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    manifest = checkpoint.read_manifest(trained)
    events: list[str] = []
    recording = [False]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event.startswith(_FORBIDDEN_EVENTS):
            events.append(event)

    sys.addaudithook(hook)  # stays for the session: inert once recording is off
    outcomes = {"built": 0, "refused": 0}
    before = set(sys.modules)
    try:
        for m in _crafted_manifests(manifest, random.Random(5)):
            recording[0] = True
            try:
                model = rebuild_model(trained, m)
                assert type(model).__module__.startswith("functrain.models."), type(model)
                outcomes["built"] += 1
            except (RunError, RecipeError):
                outcomes["refused"] += 1
            finally:
                recording[0] = False
            assert not events, (m.get("recipe"), events)
    finally:
        recording[0] = False
    assert not (tmp_path / "MARKER").exists() and "trap" not in sys.modules
    assert {n for n in set(sys.modules) - before if not n.startswith("functrain.")} == set()
    assert outcomes["refused"] > 300 and outcomes["built"] >= 1, outcomes


def test_recipe_flag_builds_the_users_model_which_must_be_a_module_that_fits(
    trained, tmp_path, monkeypatch
):
    recipe = TINY.read_text()
    (tmp_path / "wide.yaml").write_text(recipe.replace("n_embd: 32", "n_embd: 64"))
    for name in ("counter", "Plain"):
        (tmp_path / f"{name}.yaml").write_text(
            recipe.replace("functrain.models.GPT", f"factories.{name}")
        )
    (tmp_path / "factories.py").write_text(
        "import collections\n"
        "def counter(**kwargs):\n    return collections.Counter(kwargs)\n"
        "class Plain:\n    def __init__(self, **kwargs):\n        pass\n"
    )
    res = cli("sample", trained, "--recipe", "wide.yaml", cwd=tmp_path, check=False)
    _refused(res, "its weights do not fit the recipe's model")
    res = cli("sample", trained, "--recipe", "counter.yaml", cwd=tmp_path, check=False)
    _refused(res, "counter.yaml: the model factories.counter gave a Counter, not a torch.nn.Module")
    res = cli("sample", trained, "--recipe", "counter.yaml", "--trust-recipe", cwd=tmp_path,
              check=False)  # fmt: skip
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RunError, match=r"model factories.Plain is not a torch.nn.Module class"):
        rebuild_model(trained, {}, recipe=tmp_path / "Plain.yaml")


# ---------------------------------------------------------------- DCP's .metadata


def test_a_crafted_metadata_pickle_is_refused_by_every_command(sharded, tmp_path):
    good = checkpoint.load(sharded)[0]  # the uncrafted copy reads back
    assert int(good["step"]) == 2
    snap = _copy(sharded, tmp_path)
    _reseal(snap, ".metadata", EVIL_METADATA)
    why = ["torch.distributed.checkpoint.metadata.os.system", "not to be trusted"]
    res = cli("inspect", snap, cwd=tmp_path, check=False)  # reported invalid, by its problem
    assert res.returncode == 1 and "valid     NO" in res.stdout and "Traceback" not in res.stderr
    assert all(text in res.stdout for text in why), res.stdout
    commands = [
        ["sample", snap],
        ["export", snap, "--out", "w.safetensors"],
        ["export", snap, "--hf", "hf", "--trust-recipe"],
        ["resume", TINY, "out_dir=runs", *SHORT, "steps=3", "--allow-change", "steps",
         "--allow-change", "schedule", "--from", snap, "--name", "again"],
    ]  # fmt: skip
    for command in commands:
        _refused(cli(*command, cwd=tmp_path, check=False), *why)
    with pytest.raises(SnapshotError, match="os.system"):
        checkpoint.load(snap)
    assert not (tmp_path / "MARKER").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny"]


class _Runs:
    """What the crafted bytes item unpickles to, were it ever read: `os.system(TOUCH)`."""

    def __reduce__(self):
        return (os.system, (TOUCH,))


@pytest.mark.parametrize("case", ["bytes item", "path outside", "protocol 0 global"])
def test_metadata_that_would_make_dcp_unpickle_or_read_more_is_refused(
    sharded, tmp_path, monkeypatch, case
):
    """Built from allowed classes only, yet refused: DCP reads a bytes item with
    torch.load(weights_only=False), and would read any file a relative path names."""
    monkeypatch.chdir(tmp_path)
    snap = _copy(sharded, tmp_path)
    metadata = pickle.loads((snap / ".metadata").read_bytes())
    shard = (snap / "__0_0.distcp").read_bytes()
    if case == "bytes item":
        buf = io.BytesIO()
        torch.save(_Runs(), buf)
        payload = buf.getvalue()
        metadata.state_dict_metadata["step"] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex("step")] = _StorageInfo(
            "__0_0.distcp", len(shard), len(payload)
        )
        _reseal(snap, "__0_0.distcp", shard + payload)
        data, why = pickle.dumps(metadata), "BytesStorageMetadata"
    elif case == "path outside":
        index = next(iter(metadata.storage_data))
        info = metadata.storage_data[index]
        metadata.storage_data[index] = _StorageInfo("../../../etc/passwd", 0, info.length)
        data, why = pickle.dumps(metadata), "points outside the snapshot's shard files"
    else:
        data, why = b"cposix\nsystem\n(V" + TOUCH.encode() + b"\ntR.", "posix.system"
    _reseal(snap, ".metadata", data)
    with pytest.raises(SnapshotError, match=why):
        checkpoint.load(snap)
    assert not (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------- fuzz


#: Callables that run code, write files or import; each taking one string.
_DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("os", "popen"), ("subprocess", "call"),
    ("subprocess", "getoutput"), ("builtins", "exec"), ("builtins", "eval"),
    ("builtins", "__import__"), ("builtins", "open"), ("importlib", "import_module"),
    ("pty", "spawn"), ("shutil", "rmtree"), ("code", "InteractiveInterpreter"),
    ("torch", "load"), ("torch.serialization", "load"), ("pickle", "loads"),
]  # fmt: skip
#: The modules the reader allows, through which a dotted name might reach further.
_ALLOWED_MODULES = [
    "torch", "torch.serialization", "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem", "pathlib", "builtins",
]  # fmt: skip


def _hostile(real: bytes, rng: random.Random) -> list[bytes]:
    """Random bytes, mutated real metadata, and pickles calling dangerous globals."""
    cases = [real, *(rng.randbytes(rng.randrange(1, 200)) for _ in range(60))]
    cases += [rng.choice([b"\x80\x02", b"\x80\x04", b"\x80\x05"]) + rng.randbytes(64)
              for _ in range(60)]  # fmt: skip
    for _ in range(160):
        data = bytearray(real)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        if rng.random() < 0.3:
            at = rng.randrange(len(data))
            data[at:at] = rng.choice([EVIL_METADATA[2:-1], rng.randbytes(8)])
        cases.append(bytes(data))
    for module, name in _DANGEROUS:
        arg = TOUCH if name != "exec" else "open('MARKER', 'w')"
        for via in [module, *rng.sample(_ALLOWED_MODULES, 2)]:
            dotted = name if via == module else f"{module}.{name}"
            cases.append(_stack_global(via, dotted, arg))
            cases.append(f"c{via}\n{dotted}\n(V{arg}\ntR.".encode())  # protocol 0 GLOBAL
            cases.append(f"(V{arg}\ni{via}\n{dotted}\n.".encode())  # protocol 0 INST
    ext = struct.pack("<I", 0xFFFF)
    cases += [
        b"\x80\x02\x82\x01\x85R.",  # EXT1: the copyreg registry
        b"\x80\x02\x84" + ext + b".",
        b"\x80\x02Pfoo\n.",  # PERSID
        b"\x80\x02Nr" + struct.pack("<I", 50_000_000) + b".",  # LONG_BINPUT: GiBs of memo
    ]
    bare = [t.__new__(t) for t in (Metadata, TensorStorageMetadata, _StorageInfo)]  # no fields
    cases += [pickle.dumps(x) for x in (
        bare[0], Metadata({"w": bare[1]}), Metadata({}, storage_data={MetadataIndex("w"): bare[2]}),
    )]  # fmt: skip
    cases += [pickle.dumps(obj, protocol=p) for p in range(6) for obj in (
        {"a": 1}, [torch.Size([2])], os.getcwd, Path("x"), Metadata({}), range(3),
        {1, 2}, bytearray(b"x"), 1.5 + 2j, random.Random(0), zlib.crc32,
    )]  # fmt: skip
    return cases


def test_the_metadata_reader_never_runs_anything_it_reads(tmp_path, monkeypatch):
    """Every input either reads as DCP metadata or raises SnapshotError, and while the
    reader works no audited action happens but the file's own read and allowed lookups."""
    monkeypatch.chdir(tmp_path)
    real_dir = tmp_path / "real"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save({"w": torch.ones(3, 2), "step": torch.tensor(1)},
                     storage_writer=dist_cp.FileSystemWriter(real_dir), no_dist=True)  # fmt: skip
    real = (real_dir / ".metadata").read_bytes()
    assert isinstance(dcp.read_metadata(real_dir), Metadata)
    probe = tmp_path / "probe"  # the real snapshot's shard beside each input
    shutil.copytree(real_dir, probe)
    for codec in ("raw-unicode-escape", "unicode-escape", "latin-1", "ascii", "utf-8"):
        codecs.lookup(codec)  # the text opcodes' codecs, imported on first use: not later
    events: list[tuple[str, tuple]] = []
    recording = [False]

    def hook(event: str, args: tuple) -> None:  # raises nothing: the reader would catch it
        if recording[0]:
            events.append((event, args))

    sys.addaudithook(hook)  # stays for the session: inert once recording is off
    outcomes = {"read": 0, "refused": 0}
    try:
        for data in _hostile(real, random.Random(23)):
            (probe / ".metadata").write_bytes(data)
            recording[0] = True
            try:
                dcp.read_metadata(probe)
                outcomes["read"] += 1
            except SnapshotError:
                outcomes["refused"] += 1
            finally:
                recording[0] = False
            opened = [a for e, a in events if e == "open"]
            paths = [a[0] for a in opened if not isinstance(a[0], int)]  # an int: reopened fd
            assert all(str(a) == str(probe / ".metadata") for a in paths), opened
            found = [(a[0], a[1]) for e, a in events if e == "pickle.find_class"]
            assert all(f in dcp._ALLOWED and "." not in f[1] for f in found), (data, found)
            assert {e for e, _ in events} <= {"open", "pickle.find_class"}, (data, events)
            events.clear()
    finally:
        recording[0] = False
    assert not (tmp_path / "MARKER").exists()
    assert outcomes["refused"] > 300 and outcomes["read"] >= 1, outcomes
