"""Run under torchrun by tests/test_cluster.py: `functrain ARGS` with each rank working in a
folder of its own, BASE/rank<LOCAL_RANK>, as if each node had only its local disk. The
recipe's `out_dir` stays the same relative path on every rank (so the ranks agree on the
recipe), but it names a different directory on each: what a node-local `out_dir` is.

    torchrun --nproc_per_node=2 tests/_own_disk_worker.py BASE run RECIPE [key=value ...]
"""

import os
import sys
from pathlib import Path

from functrain.cli import console

disk = Path(sys.argv[1]) / f"rank{os.environ['LOCAL_RANK']}"
disk.mkdir(parents=True, exist_ok=True)
os.chdir(disk)
sys.argv = [sys.argv[0], *sys.argv[2:], "out_dir=runs"]
console()
