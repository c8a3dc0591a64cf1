"""Run under torchrun by tests/test_overlap.py: `functrain ARGS` with every gradient
collective recorded — its name, whether it was started without waiting (`async_op`), and
whether backward was still running (inside `torch.autograd.grad`) when it started. Each
rank writes its records of the last step to OUT.rank<r>.

    torchrun --nproc_per_node=2 tests/_overlap_worker.py OUT run RECIPE [key=value ...]
"""

import os
import sys
from pathlib import Path

import orjson
import torch
import torch.distributed as td

from functrain.cli import main as cli_main

where = {"backward": 0}
records: list[list] = []
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_single", "all_gather_into_tensor")


def _recorded(name, fn):
    def call(*args, **kwargs):
        records.append([name, bool(kwargs.get("async_op", False)), where["backward"] > 0])
        return fn(*args, **kwargs)

    return call


def _backward(fn):
    def call(*args, **kwargs):
        records.clear()  # keep the last step's only (eval runs no backward)
        where["backward"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            where["backward"] -= 1

    return call


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    for name in COLLECTIVES:
        if hasattr(td, name):
            setattr(td, name, _recorded(name, getattr(td, name)))
    torch.autograd.grad = _backward(torch.autograd.grad)
    # the reduction module took its names at import: rebind them there too
    from functrain.distributed import reduce

    reduce._all_gather = _recorded("all_gather", reduce._all_gather)
    code = cli_main(args)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_bytes(orjson.dumps(records))
    return code


if __name__ == "__main__":
    sys.exit(main())
