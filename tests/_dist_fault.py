"""`python -m functrain` with one fault on rank 1, for tests/test_dist.py under torchrun.

FUNCTRAIN_FAULT=override:KEY=VALUE  rank 1 alone gets one more recipe override
FUNCTRAIN_FAULT=load                rank 1 alone fails to read the snapshot
FUNCTRAIN_FAULT=read                rank 1 alone checks it, then fails to read it into its state

The distributed machinery stays real; only what rank 1 sees is changed.
"""

import os
import sys

from functrain import checkpoint
from functrain.checkpoint import manager
from functrain.cli import main

fault = os.environ["FUNCTRAIN_FAULT"]


def _unreadable(path, *args, **kwargs):
    raise checkpoint.SnapshotError(f"{os.path.basename(path)} is unreadable here")


if os.environ.get("RANK") == "1":
    if fault.startswith("override:"):
        sys.argv.append(fault.removeprefix("override:"))
    elif fault == "load":  # what Snapshots.read checks and reads a snapshot with, and what
        # a resume reads an unsharded one into its state with
        manager.load = manager.check = manager.read_into = _unreadable
    elif fault == "read":  # the checks pass; the read into the state fails
        manager.read_into = _unreadable
    else:
        raise SystemExit(f"unknown FUNCTRAIN_FAULT {fault!r}")
sys.exit(main())
