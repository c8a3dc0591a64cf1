"""`python -m functrain ...`, the form torchrun launches."""

import sys

from functrain.run.cli import main

sys.exit(main())
