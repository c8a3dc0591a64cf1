"""`functrain ARGS` with every host read and control collective counted, per step.

    [torchrun --nproc_per_node=N] tests/_sync_worker.py OUT_JSON functrain-args...

Written to OUT_JSON (per rank: OUT_JSON.rank<r>), one entry per step number k, for what
happened from the start of step k's `run_step` to the start of the next:
- "reads": host reads (`item`, `int`, `float`, `bool`, `tolist`, `numpy`) of any tensor but
  the state's host-side entries (step, data.samples, metrics.lr, rng: CPU tensors by
  design, whose reads never wait for a device), each as the functrain line that read;
- "control": torch.distributed calls made outside `run_step` (the step's own gradient
  reductions are its work), each as [name, async_op].
On a GPU each counted read would wait for the device; each blocking control collective
would, too, and for the slowest rank.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import orjson
import torch
import torch.distributed as td
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from functrain.cli import main as cli_main
from functrain.run import trainer

HOST_ENTRIES = ("step", ("data", "samples"), ("metrics", "lr"), "rng")
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "all_gather_object", "barrier", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "reduce_scatter_tensor", "scatter", "monitored_barrier",
)  # fmt: skip

steps: dict[int, dict] = {}
where = {"step": 0, "inside": False, "allowed": set()}


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/functrain/" in frame.filename and "_sync_worker" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"
    return "?"


def _record(kind: str, value) -> None:
    steps.setdefault(where["step"], {"reads": [], "control": []})[kind].append(value)


def _ptrs(state) -> set[int]:
    return {
        (getattr(state, k) if isinstance(k, str) else getattr(state, k[0])[k[1]])
        .untyped_storage()
        .data_ptr()
        for k in HOST_ENTRIES
    }


class Reads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.untyped_storage().data_ptr() not in where["allowed"]:
                _record("reads", _site())
        return func(*args, **(kwargs or {}))


class ListReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        listed = func in (torch.Tensor.tolist, torch.Tensor.numpy)
        if listed and args[0].untyped_storage().data_ptr() not in where["allowed"]:
            _record("reads", _site())
        return func(*args, **(kwargs or {}))


def _counted(name, fn):
    def call(*args, **kwargs):
        if not where["inside"]:
            _record("control", [name, bool(kwargs.get("async_op", False))])
        return fn(*args, **kwargs)

    return call


def _step(fn):
    def call(state, batch):
        where["step"] += 1
        where["allowed"] = _ptrs(state)
        where["inside"] = True
        try:
            out = fn(state, batch)
        finally:
            where["inside"] = False
        where["allowed"] |= _ptrs(out)
        return out

    return call


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    for name in COLLECTIVES:
        setattr(td, name, _counted(name, getattr(td, name)))
    trainer.run_step = _step(trainer.run_step)
    with Reads(), ListReads():
        code = cli_main(args)
    rank = int(os.environ.get("RANK", "0"))  # the group is gone by now
    Path(f"{out}.rank{rank}").write_bytes(orjson.dumps(steps, option=orjson.OPT_NON_STR_KEYS))
    return code


if __name__ == "__main__":
    sys.exit(main())
