"""`python -m functrain ...`, the form torchrun launches."""

import sys

from functrain.cli import main

sys.exit(main())
