"""Weights a run starts from (`init_from:`): a safetensors file, a directory in the
`save_pretrained` layout (`model.safetensors`, or shards with `model.safetensors.index.json`)
or a functrain snapshot (its weights only: params, frozen params, buffers).

    info = init_from(model, "gpt2-small/", rename={"transformer.": ""})

Names are matched as `load_state_dict(strict=True)` matches them, with every missing and
unexpected key listed; a weight tied to another (`lm_head.weight = wte.weight`, which
`save_pretrained` writes once) may be absent from the file. Each value keeps the model's
dtype. `info` (source, format, content hash) goes into every manifest, so a resume whose
file changed is refused. No pickle is read: a `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import orjson
import torch
from torch import nn

from functrain.checkpoint.manifest import MANIFEST
from functrain.checkpoint.snapshot import load
from functrain.errors import ConfigError, SnapshotError
from functrain.hashing import tensor_bytes
from functrain.parallel import aliases
from functrain.state import state_dict_keys, weights

__all__ = ["init_from", "read_weights"]

_SHOWN = 8  # keys of each kind an error lists


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(name -> tensor, format) of the weights at `path`; a SnapshotError says why not."""
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).is_file():
        tensors, _ = load(p)
        return weights(tensors), "snapshot"
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for name in _shards(index):
                out.update(_safetensors(p / name))
            return out, "pretrained"
        if (p / "model.safetensors").is_file():
            return _safetensors(p / "model.safetensors"), "pretrained"
        pickled = [f.name for f in p.glob("*.bin")]
        raise SnapshotError(
            f"init_from: {p} holds no model.safetensors (nor a sharded index)"
            + (
                f"; {', '.join(pickled)} is a pickle, which can run code and is not read: "
                "convert it to safetensors (transformers: save_pretrained(dir, "
                "safe_serialization=True))"
                if pickled
                else ""
            )  # fmt: skip
        )
    if p.is_file():
        return _safetensors(p), "safetensors"
    raise SnapshotError(
        f"init_from: {p} not found; give a .safetensors file, a save_pretrained directory "
        "or a functrain snapshot (state_N)"
    )


def _shards(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names: plain file names beside it."""
    try:
        weight_map = orjson.loads(index.read_bytes())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise SnapshotError(
            f"init_from: {index} is not a sharded index (a JSON object with a weight_map of "
            f"names to files): {err!r}"
        ) from err
    bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
    if bad:
        raise SnapshotError(
            f"init_from: {index} names shard files outside its directory ({bad[0]!r}); a "
            "save_pretrained index names files beside it"
        )
    return files


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ConfigError(
            f"init_from: reading {path} needs the safetensors package: pip install "
            "'functrain[safetensors]'"
        ) from err
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own errors: a truncated or foreign file
        raise SnapshotError(f"init_from: {path} is not a readable safetensors file: {err}") from err


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every (name, dtype, shape, bytes), names sorted: the same weights give the
    same hash whatever file layout holds them."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(orjson.dumps([name, str(t.dtype), list(t.shape)]))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bytes (so a tied weight holding a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


def _renamed(
    tensors: dict[str, torch.Tensor], rename: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Each key with the longest matching prefix of `rename` replaced."""
    prefixes = sorted(rename, key=len, reverse=True)
    out = {}
    for key, t in tensors.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        out[key if old is None else rename[old] + key[len(old) :]] = t
    return out


def init_from(
    model: nn.Module, path: str | os.PathLike, rename: Mapping[str, str] | None = None
) -> dict:
    """Copy the weights at `path` into `model` (strict names, the model's dtypes); returns
    what a manifest records of them: `{"path", "format", "sha256"}`."""
    found, kind = read_weights(path)
    digest = content_hash(found)
    found = _renamed(found, rename or {})
    alias = aliases(model)  # every name -> the name its tensor is kept under (tied weights)
    wanted = state_dict_keys(model)
    provided: dict[str, torch.Tensor] = {}
    for key in wanted:
        if key not in found:
            continue
        first = alias.get(key, key)
        if first in provided and not _same(provided[first], found[key]):
            raise ConfigError(
                f"init_from: {path} holds different values for {first} and {key}, which the "
                "model ties (one tensor under both names): it was saved from a model that did "
                "not tie them. Untie them in your model, or drop one from the file"
            )
        provided.setdefault(first, found[key])
    missing = [k for k in wanted if alias.get(k, k) not in provided]
    unexpected = [k for k in found if k not in alias and k not in wanted]
    if missing or unexpected:
        raise ConfigError(
            f"init_from: {path} does not match the model: "
            + "; ".join(
                f"{what} {len(keys)} ({', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
            + ". Rename keys with init_from_map: {OLD_PREFIX: NEW_PREFIX} (e.g. "
            "{'model.': ''}), or start from a file of this model"
        )
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    with torch.no_grad():
        for key, source in provided.items():
            target = targets[key]
            if target.shape != source.shape:
                raise ConfigError(
                    f"init_from: {key} is {list(source.shape)} in {path}, "
                    f"{list(target.shape)} in the model"
                )
            target.copy_(source.to(target.dtype))
    return {"path": str(path), "format": kind, "sha256": digest}
