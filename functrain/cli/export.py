"""`functrain export SNAPSHOT --out model.safetensors [--ema]`: a snapshot's weights for the
plain `nn.Module`, in the safetensors format (the optional extra `functrain[safetensors]`).

The file holds the params (or their EMA), frozen params and buffers keyed as
`model.state_dict()` is — a tied weight under each of its names, as a strict
`load_state_dict` needs — and
in its metadata the snapshot's step, the functrain version and the recipe's `model`
component with its arguments (JSON), so the module can be rebuilt without functrain's loop.
It is written under a temporary name and renamed; an existing file is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import orjson

from functrain import checkpoint
from functrain.cli.rebuild import rebuild_model
from functrain.cli.sample import refuse_trainable_only
from functrain.errors import RunError
from functrain.state import weights

__all__ = ["export", "export_pretrained"]


def export(snapshot: Path, out: Path, *, ema: bool = False) -> dict[str, str]:
    """Write the weights of `snapshot` to `out`; return the file's metadata."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise RunError(
            "functrain export needs the `safetensors` package, an optional extra: "
            "pip install 'functrain[safetensors]'"
        ) from None
    if out.exists():
        raise RunError(f"{out} already exists; export writes a new file: pick another --out")
    tensors, manifest = checkpoint.load(snapshot)
    refuse_trainable_only(snapshot, manifest)
    try:
        found = weights(tensors, ema=ema)
    except ValueError as err:
        raise RunError(f"{snapshot}: {err}; export it without --ema") from err
    meta = {
        "format": "pt",
        "functrain_version": str(manifest.get("versions", {}).get("functrain")),
        "step": str(manifest["step"]),
        "weights": "ema" if ema else "params",
        "model": orjson.dumps(manifest.get("recipe", {}).get("model")).decode(),
    }
    for alias, first in manifest.get("tied", {}).items():  # strict loads need every name
        if first in found and alias not in found:
            found[alias] = found[first]
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in found.items()}
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(plain, str(tmp), metadata=meta)
        os.replace(tmp, out)
    except Exception as err:  # a full disk, a directory we may not write: one paragraph
        _refuse_unwritten(out, err, plain)
        raise
    finally:
        with contextlib.suppress(OSError):  # e.g. --out under a file: the error above says it
            tmp.unlink(missing_ok=True)
    return meta


def _refuse_unwritten(out: Path, err: Exception, tensors: dict) -> None:
    """Raise a `RunError` naming `out`, the OS error and the space, if `err` is a failed
    write: an `OSError`, or safetensors' error carrying one ("... (os error 28)")."""
    found = re.search(r"\(os error (\d+)\)", str(err))
    if not isinstance(err, OSError) and found is None:
        return
    oserr = err if isinstance(err, OSError) else OSError(int(found[1]), os.strerror(int(found[1])))
    need = sum(v.numel() * v.element_size() for v in tensors.values())
    raise RunError(
        f"could not write {out}: {checkpoint.write_problem(oserr, out.parent, need)}. Nothing "
        "was left half-written; free space or choose another path, and export again."
    ) from err


def export_pretrained(
    snapshot: Path,
    out: Path,
    *,
    ema: bool = False,
    recipe: Path | None = None,
    trust_recipe: bool = False,
) -> Path:
    """For a `transformers` model: rebuild it from the `recipe` file (or the manifest, as
    `functrain.cli.rebuild` allows), give it the snapshot's weights (strictly) and
    `save_pretrained(out)`, a directory its `from_pretrained` loads (config included, tied
    weights as transformers keeps them)."""
    from functrain.state import load_into

    if out.exists():
        raise RunError(f"{out} already exists; export --hf writes a new directory")
    tensors, manifest = checkpoint.load(snapshot)
    refuse_trainable_only(snapshot, manifest)
    model = rebuild_model(snapshot, manifest, recipe=recipe, trust=trust_recipe)
    if not callable(getattr(model, "save_pretrained", None)):
        target = (manifest.get("recipe", {}).get("model") or {}).get("_component_")
        raise RunError(
            f"{snapshot}: export --hf needs a transformers model (one with save_pretrained); "
            f"{target} is a {type(model).__name__}: export it with --out FILE.safetensors"
        )
    try:
        load_into(model, tensors, ema=ema)
    except (ValueError, RuntimeError) as err:
        raise RunError(f"{snapshot}: its weights do not fit the recipe's model: {err}") from err
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        os.replace(tmp, out)
    except Exception as err:
        _refuse_unwritten(out, err, model.state_dict())
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
