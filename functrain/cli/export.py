"""`functrain export SNAPSHOT --out model.safetensors [--ema]`: a snapshot's weights for the
plain `nn.Module`, in the safetensors format (the optional extra `functrain[safetensors]`).

The file holds the params (or their EMA) and buffers keyed as `model.state_dict()` is, and
in its metadata the snapshot's step, the functrain version and the recipe's `model`
component with its arguments (JSON), so the module can be rebuilt without functrain's loop.
It is written under a temporary name and renamed; an existing file is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from functrain import checkpoint
from functrain.errors import RunError
from functrain.state import weights

__all__ = ["export"]


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
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in found.items()}
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(plain, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return meta
