"""`python -m functrain` with one fault on rank 1, for tests/test_dist.py under torchrun.

FUNCTRAIN_FAULT=override:KEY=VALUE  rank 1 alone gets one more recipe override
FUNCTRAIN_FAULT=load                rank 1 alone fails to read the snapshot

The distributed machinery stays real; only what rank 1 sees is changed.
"""

import os
import sys

from functrain import checkpoint
from functrain.checkpoint import manager
from functrain.cli import main

fault = os.environ["FUNCTRAIN_FAULT"]
if os.environ.get("RANK") == "1":
    if fault.startswith("override:"):
        sys.argv.append(fault.removeprefix("override:"))
    elif fault == "load":

        def _unreadable(path, *args, **kwargs):
            raise checkpoint.SnapshotError(f"{os.path.basename(path)} is unreadable here")

        manager.load = _unreadable  # what Snapshots.read reads a snapshot with
    else:
        raise SystemExit(f"unknown FUNCTRAIN_FAULT {fault!r}")
sys.exit(main())
