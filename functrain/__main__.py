"""`python -m functrain ...`, the form torchrun launches."""

from functrain.cli import console

console()
