"""`python -m functrain ARGS` under torchrun, for tests/test_dist.py: each rank writes its
exit status to `$FUNCTRAIN_CODES/rank<r>.code` and then exits 0, so a test sees every rank's
own status (torchrun would SIGTERM the others once one rank exits non-zero)."""

import os
import sys
from pathlib import Path

from functrain.cli import main

code = main(sys.argv[1:])
Path(os.environ["FUNCTRAIN_CODES"], f"rank{os.environ['RANK']}.code").write_text(str(code))
