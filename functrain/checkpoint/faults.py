"""Test-only fault injection for the reliability tests. A no-op unless one of the two
environment variables below is set: `inject` is called once before each file a save writes,
so that a test can kill a run mid-save or make one save fail as a full disk would.

Nothing else in functrain reads these variables; a user never sets them.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from functrain.checkpoint._files import tmp_prefix

#: Seconds to sleep before each file of a save, so a kill can land mid-save.
SLOW_SAVE_ENV = "FUNCTRAIN_TEST_SLOW_SAVE"
#: `ERRNO[:state_N]` (e.g. `ENOSPC:state_4`) fails that save at its second file.
SAVE_ERROR_ENV = "FUNCTRAIN_TEST_SAVE_ERROR"


def inject(path: Path, index: int) -> None:
    """Before writing file number `index` of a save at `path`: sleep or fail, if asked to."""
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))
    fault = os.environ.get(SAVE_ERROR_ENV)
    if fault and index == 1:
        code, _, snapshot = fault.partition(":")
        if not snapshot or path.parent.name.startswith(tmp_prefix(snapshot)):
            number = getattr(errno, code)
            raise OSError(number, os.strerror(number), str(path))
