"""`functrain ARGS` with `torch.cuda.set_sync_debug_mode("error")` over the plain steps.

    python tests/_cuda_sync_worker.py PLAIN functrain-args...

PLAIN: comma-separated step numbers. From the start of each such step's `run_step` to the
start of the next step's, any operation that makes the host wait for the GPU (`item`, a
blocking copy to the host, a stream synchronize) raises, so the run fails; elsewhere (log,
eval, snapshot steps, the first steps) the mode is torch's default.
"""

from __future__ import annotations

import sys

import torch

from functrain.cli import main as cli_main
from functrain.run import trainer

PLAIN = {int(k) for k in sys.argv[1].split(",")}
counted = {"step": 0, "checked": 0}


def _watched(fn):
    def call(state, batch):
        counted["step"] += 1
        plain = counted["step"] in PLAIN
        counted["checked"] += plain
        torch.cuda.set_sync_debug_mode("error" if plain else "default")
        return fn(state, batch)

    return call


trainer.run_step = _watched(trainer.run_step)
try:
    code = cli_main(sys.argv[2:])
finally:
    torch.cuda.set_sync_debug_mode("default")
print(f"checked {counted['checked']} plain steps")
sys.exit(code)
