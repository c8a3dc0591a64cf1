"""Checks of the integer arguments of the data functions."""

import operator
from typing import Any

from functrain.errors import DataError


def as_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int >= minimum, or a DataError (a ValueError) naming the argument."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return operator.index(value)
