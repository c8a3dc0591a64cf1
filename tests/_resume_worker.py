"""Resume in a new process: python _resume_worker.py SNAPSHOT N NUM_WORKERS OUT_DIR."""

import sys
from pathlib import Path

import orjson
from _resume_common import restore, save, train

snapshot, n, workers, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
state, losses = train(restore(snapshot, n), n, workers)
save(out / "final", state)
(out / "losses.json").write_bytes(orjson.dumps(losses))
